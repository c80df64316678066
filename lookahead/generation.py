"""The generation loop: prefill, then one forward pass per step over each row's draft tree, acceptance of the
longest correct path, in-place KV compaction, and the host-side commit of the accepted tokens.

Plain decoding is the same loop with an empty draft (a one-node tree per row) and no drafter. Per step the
host does O(draft size) work and reads the device once (the accepted tokens, and the nodes' top-k when
recycled branches are on).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from lookahead.config import LookaheadConfig
from lookahead.cost import calibrate
from lookahead.draft import bucket_size, draft_trees, pack_drafts
from lookahead.drafter import Drafter
from lookahead.nvtx import nvtx_range
from lookahead.sampling import TokenChooser
from lookahead.steps import StepGraphs, graphs_enabled, read_step_row, tree_step

_request_ids = itertools.count()


@dataclass
class GenerationStats:
    """Per call, summed over the rows of the batch. `steps` counts forward passes a row took part in (the
    prefill included), so plain decoding has accepted_per_step == 1.0 exactly."""
    steps: int = 0
    decode_steps: int = 0  # of steps: the row-steps after the prefill
    new_tokens: int = 0
    draft_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    host_s: float = 0.0  # of decode_s: drafting, packing and committing on the host

    @property
    def accepted_per_step(self) -> float:
        return self.new_tokens / max(self.steps, 1)

    @property
    def draft_tokens_per_step(self) -> float:
        return self.draft_tokens / max(self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after each row's first (which the prefill produces) over the decode time."""
        return (self.new_tokens - (self.steps - self.decode_steps)) / max(self.decode_s, 1e-9)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "decode_steps": self.decode_steps, "new_tokens": self.new_tokens, "accepted_per_step": self.accepted_per_step,
                "draft_tokens_per_step": self.draft_tokens_per_step, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "host_s": self.host_s}


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, T + new], prompt included, rows padded after their end
    stats: GenerationStats


class StopStrings:
    """transformers' stop_strings: the output ends with the token that completes any of the strings."""

    def __init__(self, strings, tokenizer):
        if isinstance(strings, str):
            strings = [strings]
        if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop_strings must be a non-empty string or list of non-empty strings, got {strings!r}")
        if tokenizer is None:
            raise ValueError("stop_strings need tokenizer=... to read the generated text (as in transformers)")
        self.strings, self.tokenizer = list(strings), tokenizer
        # a stop string of n characters lies within the last n + 4 tokens: a token decodes to >= 1 character
        # except special or partial-UTF-8 tokens, for which the slack is kept generous
        self.window = max(len(s) for s in self.strings) + 4

    def first_stop(self, output: list[int], new: list[int]) -> int | None:
        """Index j of the first token of `new` whose text completes a stop string after `output`, else None."""
        tokens = output[-self.window:] + new
        offset = len(tokens) - len(new)
        for j in range(len(new)):
            text = self.tokenizer.decode(tokens[max(0, offset + j + 1 - self.window):offset + j + 1])
            if any(s in text for s in self.strings):
                return j
        return None


def cut_new_tokens(new: list[int], context: list[int], prompt_len: int, max_new_tokens: int, eos: set[int],
                   stops: StopStrings | None) -> tuple[list[int], str | None]:
    """A row's accepted tokens cut at max_new_tokens, the first eos, or the token that completes a stop string:
    (kept, None while the row goes on, else "length" or "stop"). O(new tokens): the context is never copied."""
    room = max_new_tokens - (len(context) - prompt_len)
    new, ended = new[:room], ("length" if len(new) >= room else None)
    for j, t in enumerate(new):
        if t in eos:
            return new[:j + 1], "stop"
    if stops is not None:
        j = stops.first_stop(context[max(prompt_len, len(context) - stops.window):], new)
        if j is not None:
            return new[:j + 1], "stop"
    return new, ended


@dataclass
class DecodeState:
    """The rows of one generate call between steps: their committed tokens, which still advance, and the
    per-row bookkeeping of a commit (end conditions, sampler, drafter, stats, streamer)."""
    prompt_lens: list[int]
    contexts: list[list[int]]  # prompt + output so far, per row
    request_ids: list[int]
    active: list[bool]
    step_mask: torch.Tensor  # [B] int64 on the device, 1 for rows that advance
    eos: set[int]
    max_new_tokens: int
    chooser: TokenChooser
    drafter: Drafter | None
    stops: StopStrings | None = None
    streamer: object = None
    stats: GenerationStats = field(default_factory=GenerationStats)

    def output(self, b: int) -> list[int]:
        return self.contexts[b][self.prompt_lens[b]:]

    def commit(self, b: int, new: list[int], predictions: dict[int, list[int]] | None = None) -> None:
        """Append row b's accepted tokens, cut at the first eos, stop string or max_new_tokens, and tell everyone
        who learns from them; a row that ends stops advancing."""
        new, ended = cut_new_tokens(new, self.contexts[b], self.prompt_lens[b], self.max_new_tokens, self.eos,
                                    self.stops)
        self.contexts[b] += new
        self.chooser.commit(b, new)
        if self.drafter is not None:
            self.drafter.update(self.request_ids[b], new, predictions)
        self.stats.steps += 1
        self.stats.new_tokens += len(new)
        if self.streamer is not None:
            self.streamer.put(torch.tensor(new))
        if ended is not None:
            self.active[b] = False
            self.step_mask[b] = 0


def _lookahead_config(lookahead, trie) -> LookaheadConfig | None:
    """lookahead=True: the default settings with the model's trie's window length and bound (so a trie saved
    with other settings and assigned to model.trie just works); an explicit config must agree with the trie."""
    if lookahead is False or lookahead is None:
        return None
    if lookahead is True:
        return LookaheadConfig(branch_length=trie.branch_length, max_trie_nodes=trie.max_trie_nodes)
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


def _eos_ids(eos_token_id, default: list[int], vocab: int) -> set[int]:
    if eos_token_id is None:
        return set(default)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if (isinstance(eos_token_id, bool) or not isinstance(ids, (list, tuple, set))
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids)):
        raise ValueError(f"eos_token_id must be an int or a list of ints in [0, {vocab}) (the vocabulary), got "
                         f"{eos_token_id!r}; pass [] to never stop at a token")
    return set(ids)


def _check_new_tokens(max_new_tokens) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


def drafter_for(model, cfg: LookaheadConfig) -> Drafter:
    """The call's drafter over the model's trie, calibration and recycled tokens; its size policy prices drafts
    with the model's measured cost curve (measured now if this machine has none cached yet)."""
    curve = calibrate(model, bucket_size(cfg.decoding_length + 1)) if cfg.adaptive else None
    return Drafter(cfg, cost_curve=curve, trie=model.trie, calibration=model.state.calibration,
                   successors=model.state.successors)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 256,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int | None = None, eos_token_id=None, lookahead=True,
             references=None, tokenizer=None, stop_strings=None, streamer=None,
             return_dict_in_generate: bool = False):
    """See API.md. Greedy lookahead returns exactly the tokens of plain greedy decoding."""
    model._check_ids(input_ids)
    _check_new_tokens(max_new_tokens)
    cfg = _lookahead_config(lookahead, model.trie)
    rows = _prompt_rows(input_ids, attention_mask)
    chooser = TokenChooser(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed, vocab=model.config.vocab_size,
                           prompts=rows, device=model.device)
    ref_ids = _reference_ids(references, tokenizer)
    eos = _eos_ids(eos_token_id, model.config.eos_token_id, model.config.vocab_size)
    stops = StopStrings(stop_strings, tokenizer) if stop_strings is not None else None
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
    drafter = drafter_for(model, cfg) if cfg is not None else None  # may measure the cost curve: untimed

    device = model.device
    max_tree = bucket_size(cfg.decoding_length + 1) if cfg else 1
    cache = model.kv_cache(B, T + max_new_tokens + max_tree)
    state = DecodeState(prompt_lens=[len(r) for r in rows], contexts=[list(r) for r in rows],
                        request_ids=[next(_request_ids) for _ in range(B)], active=[True] * B,
                        step_mask=torch.ones(B, dtype=torch.long, device=device), eos=eos,
                        max_new_tokens=max_new_tokens, chooser=chooser, drafter=drafter, stops=stops,
                        streamer=streamer)
    if drafter is not None:
        for rid, row in zip(state.request_ids, rows):
            drafter.begin_request(rid, row, ref_ids)
    try:
        # ---- prefill: rows right-aligned by the caller's left padding are moved to start at slot 0 ----
        t0 = time.perf_counter()
        lengths = torch.tensor(state.prompt_lens, device=device)
        shift = (T - lengths)[:, None]  # (B, 1)
        gather = (torch.arange(T, device=device)[None] + shift).clamp(max=T - 1)  # (B, T)
        logits = model.prefill(input_ids.to(device).gather(1, gather), lengths, cache)  # (B, V)
        first = chooser(logits[:, None], lengths[:, None])[:, 0].tolist()  # the token at position len(prompt)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for b in range(B):
            state.commit(b, [first[b]])
        state.stats.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        decode(model, cache, state, cfg)
        state.stats.decode_s = time.perf_counter() - t0
    finally:
        if drafter is not None:
            for rid in state.request_ids:
                drafter.end_request(rid)
    if streamer is not None:
        streamer.end()

    pad = min(eos) if eos else 0
    outputs = [state.output(b) for b in range(B)]
    width = max(len(o) for o in outputs)
    new = torch.full((B, width), pad, dtype=input_ids.dtype)
    for b, out in enumerate(outputs):
        new[b, :len(out)] = torch.tensor(out, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids.cpu(), new], dim=1).to(input_ids.device)
    return GenerateOutput(sequences, state.stats) if return_dict_in_generate else sequences


def decode(model, cache, state: DecodeState, cfg: LookaheadConfig | None) -> None:
    """Steps until every row has ended: draft -> one verify step on the device -> one read -> commit."""
    graphs = StepGraphs.for_cache(model, cache) if graphs_enabled(model, state.chooser) else None
    layout = cfg.layout if cfg is not None else "hier"
    top_k = min(cfg.recycle_top_k, model.config.vocab_size) if cfg is not None else 0
    B = len(state.contexts)
    stats = state.stats
    while any(state.active):
        t0 = time.perf_counter()
        with nvtx_range("draft"):
            if state.drafter is not None:
                contexts = [ctx if on else None for ctx, on in zip(state.contexts, state.active)]
                proposals = state.drafter.draft_batch(state.request_ids, contexts)
            else:
                proposals = [([], [])] * B
            drafts = draft_trees([ctx[-1] for ctx in state.contexts], proposals, layout)
            batch = pack_drafts(drafts, model.device)
        t1 = time.perf_counter()
        step_inputs = (batch.tokens, batch.parents, batch.depths, batch.tree_mask, state.step_mask)
        if graphs is not None:
            result = graphs.run(state.chooser, *step_inputs, top_k=top_k)
        else:
            result = tree_step(model, cache, state.chooser, *step_inputs, top_k=top_k)
        host = result.tolist()  # the one device-to-host sync of the step
        t2 = time.perf_counter()
        with nvtx_range("commit"):
            for b in range(B):
                if not state.active[b]:
                    continue
                stats.draft_tokens += drafts[b].num_draft
                stats.decode_steps += 1
                state.commit(b, *read_step_row(host[b], drafts[b].tokens, top_k))
        stats.host_s += (t1 - t0) + (time.perf_counter() - t2)
