"""The generation loop: prefill, then one forward pass per step over each row's draft tree (a single root
node for plain decoding), acceptance of the longest correct path, in-place KV compaction, trie update.

Per step the host does O(draft size) work and reads the device once (the accepted tokens).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from lookahead.budget import DraftBudget
from lookahead.config import LookaheadConfig
from lookahead.draft import bucket_size, build_draft, pack_drafts
from lookahead.nvtx import nvtx_range
from lookahead.sampling import TokenChooser
from lookahead.steps import StepGraphs, graphs_enabled, plain_step, tree_step
from lookahead.trie import TokenTrie

_request_ids = itertools.count()


@dataclass
class GenerationStats:
    """Per call, summed over the rows of the batch. `steps` counts forward passes a row took part in (the
    prefill included), so plain decoding has accepted_per_step == 1.0 exactly."""
    steps: int = 0
    new_tokens: int = 0
    draft_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    host_s: float = 0.0  # of decode_s: trie retrieval, draft building and trie updates on the host

    @property
    def accepted_per_step(self) -> float:
        return self.new_tokens / max(self.steps, 1)

    @property
    def draft_tokens_per_step(self) -> float:
        return self.draft_tokens / max(self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "new_tokens": self.new_tokens, "accepted_per_step": self.accepted_per_step,
                "draft_tokens_per_step": self.draft_tokens_per_step, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "host_s": self.host_s}


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, T + new], prompt included, rows padded after their end
    stats: GenerationStats


def _lookahead_config(lookahead) -> LookaheadConfig | None:
    if lookahead is False or lookahead is None:
        return None
    if lookahead is True:
        return LookaheadConfig()
    if isinstance(lookahead, LookaheadConfig):
        return lookahead
    raise ValueError(f"lookahead must be True, False or a LookaheadConfig, got {lookahead!r}")


def _prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """The real (unpadded) tokens of each row; only left padding is accepted, as transformers' decoder-only
    models expect."""
    ids = input_ids.tolist()
    if attention_mask is None:
        return ids
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}: they must match")
    rows = []
    for b, (row, mask) in enumerate(zip(ids, attention_mask.tolist())):
        n = sum(1 for m in mask if m)
        if n == 0 or any(m not in (0, 1) for m in mask) or mask != [0] * (len(mask) - n) + [1] * n:
            raise ValueError(f"attention_mask row {b} must be 0s (left padding) followed by at least one 1; "
                             "pad prompts on the left (tokenizer.padding_side = 'left')")
        rows.append(row[len(row) - n:])
    return rows


def _reference_ids(references, tokenizer) -> list[list[int]]:
    if references is None:
        return []
    if isinstance(references, (str, bytes)) or not isinstance(references, (list, tuple)):
        raise ValueError("references must be a list of strings or of token-id lists")
    out = []
    for ref in references:
        if isinstance(ref, str):
            if tokenizer is None:
                raise ValueError("string references need tokenizer=... to be tokenized "
                                 "(or pass them as lists of token ids)")
            out.append(tokenizer(ref, add_special_tokens=False).input_ids)
        elif isinstance(ref, (list, tuple)) and all(isinstance(t, int) for t in ref):
            out.append(list(ref))
        else:
            raise ValueError("each reference must be a string or a list of int token ids")
    return out


def _trie_for(model, cfg: LookaheadConfig) -> TokenTrie:
    trie = model.trie
    if trie is None or trie.branch_length != cfg.branch_length or trie.max_trie_nodes != cfg.max_trie_nodes:
        model.trie = trie = TokenTrie(branch_length=cfg.branch_length, max_trie_nodes=cfg.max_trie_nodes)
    return trie


def _check_new_tokens(max_new_tokens) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 256,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int | None = None, eos_token_id=None, lookahead=True,
             references=None, tokenizer=None, streamer=None, return_dict_in_generate: bool = False):
    """See API.md. Greedy lookahead returns exactly the tokens of plain greedy decoding."""
    model._check_ids(input_ids)
    _check_new_tokens(max_new_tokens)
    cfg = _lookahead_config(lookahead)
    rows = _prompt_rows(input_ids, attention_mask)
    chooser = TokenChooser(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed, vocab=model.config.vocab_size,
                           prompts=rows, device=model.tok_embeddings.weight.device)
    ref_ids = _reference_ids(references, tokenizer)
    eos = set(model.config.eos_token_id if eos_token_id is None else
              ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)))
    B, T = input_ids.shape
    limit = model.config.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                         f"of {limit} tokens: shorten the prompt or lower max_new_tokens")
    window = model.config.sliding_window
    if window is not None and T + max_new_tokens > window:
        raise ValueError(f"prompt + max_new_tokens ({T + max_new_tokens}) exceeds the sliding window ({window}), "
                         "which lookahead does not implement: lower max_new_tokens")
    if streamer is not None and B != 1:
        raise ValueError("a streamer works with one row at a time (batch size 1), as in transformers")

    device = model.tok_embeddings.weight.device
    max_tree = bucket_size(cfg.decoding_length + 1) if cfg else 1
    cache = model.kv_cache(B, T + max_new_tokens + max_tree)
    stats = GenerationStats()

    # ---- prefill: rows right-aligned by the caller's left padding are moved to start at slot 0 ----
    t0 = time.perf_counter()
    lengths = torch.tensor([len(r) for r in rows], device=device)
    shift = (T - lengths)[:, None]  # (B, 1)
    gather = (torch.arange(T, device=device)[None] + shift).clamp(max=T - 1)  # (B, T)
    right_padded = input_ids.to(device).gather(1, gather)
    logits = model.prefill(right_padded, lengths, cache)  # (B, V)
    first = chooser(logits[:, None], lengths[:, None])[:, 0]  # (B,) the token at position len(prompt)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    outputs: list[list[int]] = [[t] for t in first.tolist()]
    for b, out in enumerate(outputs):
        chooser.commit(b, out)
    stats.prefill_s = time.perf_counter() - t0
    stats.steps, stats.new_tokens = B, B
    if streamer is not None:
        streamer.put(first.cpu())
    active = [not (out[0] in eos or max_new_tokens == 1) for out in outputs]

    t0 = time.perf_counter()
    if cfg is None:
        _plain_loop(model, cache, chooser, first, outputs, active, eos, max_new_tokens, streamer, stats)
    else:
        trie = _trie_for(model, cfg)
        request_ids = [next(_request_ids) for _ in range(B)]
        for rid, row, out in zip(request_ids, rows, outputs):
            trie.begin_request(rid, row, ref_ids)
            trie.append(rid, out)
        contexts = [row + out for row, out in zip(rows, outputs)]  # the trie query reads their tails
        try:
            _lookahead_loop(model, cache, chooser, cfg, trie, request_ids, contexts, outputs, active, eos,
                            max_new_tokens, streamer, stats)
        finally:
            for rid in request_ids:
                trie.end_request(rid)
    stats.decode_s = time.perf_counter() - t0
    if streamer is not None:
        streamer.end()

    pad = min(eos) if eos else 0
    width = max(len(o) for o in outputs)
    new = torch.full((B, width), pad, dtype=input_ids.dtype)
    for b, out in enumerate(outputs):
        new[b, :len(out)] = torch.tensor(out, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids.cpu(), new], dim=1).to(input_ids.device)
    return GenerateOutput(sequences, stats) if return_dict_in_generate else sequences


def _finish(out: list[int], new: list[int], eos: set, max_new_tokens: int) -> tuple[list[int], bool]:
    """Cut a row's newly accepted tokens at the first eos and at max_new_tokens; returns (kept, done)."""
    new = new[:max_new_tokens - len(out)]
    for j, t in enumerate(new):
        if t in eos:
            return new[:j + 1], True
    return new, len(out) + len(new) >= max_new_tokens


def _plain_loop(model, cache, chooser: TokenChooser, last: torch.Tensor, outputs, active, eos, max_new_tokens,
                streamer, stats) -> None:
    """One token per step; finished rows ride along without advancing their cache."""
    graphs = StepGraphs.for_cache(model, cache) if graphs_enabled(model, chooser) else None
    last = last[:, None].clone()  # (B, 1), overwritten by each step with its token
    step_mask = torch.tensor(active, device=last.device, dtype=torch.long)
    while any(active):
        if graphs is not None:
            graphs.run("plain", chooser, last, step_mask)
        else:
            plain_step(model, cache, chooser, last, step_mask)
        tokens = last[:, 0].tolist()  # the one device-to-host sync of the step
        for b, t in enumerate(tokens):
            if not active[b]:
                continue
            kept, done = _finish(outputs[b], [t], eos, max_new_tokens)
            outputs[b] += kept
            chooser.commit(b, kept)
            stats.steps += 1
            stats.new_tokens += len(kept)
            if streamer is not None:
                streamer.put(torch.tensor(kept))
            if done:
                active[b] = False
                step_mask[b] = 0


def _lookahead_loop(model, cache, chooser: TokenChooser, cfg: LookaheadConfig, trie: TokenTrie, request_ids, contexts,
                    outputs, active, eos, max_new_tokens, streamer, stats) -> None:
    device = cache.buffer.device
    budget = DraftBudget.for_model(model, cfg) if cfg.adaptive else None
    graphs = StepGraphs.for_cache(model, cache) if graphs_enabled(model, chooser) else None
    B = len(outputs)
    step_mask = torch.tensor(active, device=device, dtype=torch.long)  # rows that advance
    while any(active):
        t0 = time.perf_counter()
        n_draft = budget.choose(sum(active)) if budget is not None else cfg.decoding_length
        with nvtx_range("retrieve"):
            drafts = []
            for b in range(B):
                root = contexts[b][-1]
                if active[b] and n_draft > 0:
                    tail = contexts[b][-cfg.max_query_length - 1:]
                    tokens, parents = trie.retrieve(tail, n_draft, request_ids[b], cfg.max_query_length)
                else:
                    tokens, parents = [], []
                drafts.append(build_draft(root, tokens, parents, layout=cfg.layout, budget=n_draft))
        with nvtx_range("draft"):
            batch = pack_drafts(drafts, device)
        t1 = time.perf_counter()
        if graphs is not None:
            host = graphs.run("tree", chooser, batch.tokens, batch.parents, batch.depths, batch.tree_mask,
                              step_mask).tolist()  # the one device-to-host sync of the step
        else:
            host = tree_step(model, cache, chooser, batch.tokens, batch.parents, batch.depths, batch.tree_mask,
                             step_mask).tolist()
        t2 = time.perf_counter()
        with nvtx_range("trie_update"):
            for b in range(B):
                if not active[b]:
                    continue
                n, *row = host[b]
                kept, done = _finish(outputs[b], row[:n], eos, max_new_tokens)
                outputs[b] += kept
                contexts[b] += kept
                chooser.commit(b, kept)
                trie.append(request_ids[b], kept)
                stats.steps += 1
                stats.new_tokens += len(kept)
                stats.draft_tokens += drafts[b].num_draft
                if budget is not None:
                    budget.update(n_draft, n, drafts[b].num_draft)
                if streamer is not None:
                    streamer.put(torch.tensor(kept))
                if done:
                    active[b] = False
                    step_mask[b] = 0
        stats.host_s += (t1 - t0) + (time.perf_counter() - t2)

