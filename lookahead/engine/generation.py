"""`generate`: a call's rows are added to the model's engine and stepped until they end.

The engine (`lookahead/engine.py`) is the one step runner, shared with `lookahead serve`: prefill, then per step
draft -> one device step -> one device-to-host read -> commit per row. Plain decoding is the same loop with an
empty draft (a one-node tree per row) and no drafter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lookahead.config import LookaheadConfig
from lookahead.engine.engine import Engine, Sequence, StopStrings, context_limit
from lookahead.engine.sampling import SamplingParams
from lookahead.models.causal_lm import CausalLM


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


def _lookahead_config(lookahead, trie) -> LookaheadConfig | None:
    """lookahead=True: the default settings with the model's trie's window length and bound (so a trie saved
    with other settings and assigned to model.trie just works); an explicit config must agree with the trie."""
    if lookahead is False or lookahead is None:
        return None
    if lookahead is True:
        return LookaheadConfig.for_trie(trie)
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


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 256,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int | None = None, eos_token_id=None, lookahead=True,
             references=None, tokenizer=None, stop_strings=None, streamer=None,
             return_dict_in_generate: bool = False, pool: str | None = None):
    """Generate like transformers' `generate`, with lookahead drafts verified each step (docs/API.md,
    "Generating"). Greedy lookahead returns exactly the tokens of plain greedy decoding. pool: a name whose calls
    share drafting history only with each other (docs/tenants.md); None = the model's trie."""
    if pool is not None and (not isinstance(pool, str) or not pool):
        raise ValueError(f"pool must be a non-empty string naming a drafting pool, or None, got {pool!r}")
    model._check_ids(input_ids)
    cfg = _lookahead_config(lookahead, model.trie)
    rows = _prompt_rows(input_ids, attention_mask)
    sampling = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    ref_ids = _reference_ids(references, tokenizer)
    eos = frozenset(_eos_ids(eos_token_id, model.config.eos_token_id, model.config.vocab_size))
    stops = StopStrings(stop_strings, tokenizer) if stop_strings is not None else None
    B = input_ids.shape[0]
    seqs = [Sequence(row, max_new_tokens, sampling, eos, stops, ref_ids, noise_row=b, pool=pool)
            for b, row in enumerate(rows)]
    limit, where = context_limit(model)
    for seq in seqs:
        seq.check(model.config.vocab_size, limit, where)
    if streamer is not None and B != 1:
        raise ValueError("a streamer works with one row at a time (batch size 1), as in transformers")

    context = max(len(row) for row in rows) + max_new_tokens
    engine = model.state.engine
    if engine is None or not engine.fits(model, B, context):
        model.state.engine = engine = None  # free the old cache first
        model.state.engine = engine = Engine(model, B, context)
    engine.configure(cfg)  # may measure a quick cost prior (~1 s) on a machine that has no curve cached: untimed
    stats = GenerationStats()
    host_before = engine.host_s
    t0 = time.perf_counter()
    try:
        events = engine.add(seqs)
        stats.prefill_s = time.perf_counter() - t0
        if streamer is not None:
            streamer.put(input_ids.cpu())
        t0 = time.perf_counter()
        while True:
            if streamer is not None:
                for _, new in events:
                    streamer.put(torch.tensor(new))
            if all(seq.finished for seq in seqs):
                break
            events = engine.step()
        stats.decode_s = time.perf_counter() - t0
    finally:
        for seq in seqs:
            engine.remove(seq, "cancelled")  # a call that raised leaves no row behind
    if streamer is not None:
        streamer.end()
    stats.host_s = engine.host_s - host_before
    stats.steps = sum(seq.steps for seq in seqs)
    stats.decode_steps = stats.steps - B
    stats.new_tokens = sum(len(seq.output) for seq in seqs)
    stats.draft_tokens = sum(seq.draft_tokens for seq in seqs)

    pad = min(eos) if eos else 0
    width = max(len(seq.output) for seq in seqs)
    new = torch.full((B, width), pad, dtype=input_ids.dtype)
    for b, seq in enumerate(seqs):
        new[b, :len(seq.output)] = torch.tensor(seq.output, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids.cpu(), new], dim=1).to(input_ids.device)
    return GenerateOutput(sequences, stats) if return_dict_in_generate else sequences


CausalLM.run_generate = staticmethod(generate)  # what model.generate runs
