"""Choosing each node's target token: greedy, or sampled losslessly over a whole draft tree.

Sampling is the Gumbel-max trick with counter-based noise: the noise for the token at absolute position p of
noise row r is a hash of (seed, r, p, vocab id), so it does not depend on how many tokens a step verified. Every
node at depth d of a tree predicts position cache_len + d + 1 and sees the same noise a plain step at that
position would see, so lookahead and plain sampling with one seed return the same tokens, and each emitted
token is an exact sample of the processed distribution. Processors that look at earlier tokens (repetition
penalty) see each node's own path: the committed tokens plus the node's ancestors.

One `TokenChooser` serves every row of an engine at once: each row carries its own settings (greedy or sampled,
temperature, top-k, top-p, penalty, seed, noise row), held in per-row device tensors, so a step with mixed
requests chooses all its targets in one batched pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lookahead.kernels import gumbel_noise


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings, with transformers' meaning; invalid values raise ValueError. seed=None
    with do_sample draws one from torch's RNG (so torch.manual_seed still makes runs repeatable)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {self.do_sample!r}")
        if (not isinstance(self.repetition_penalty, (int, float)) or isinstance(self.repetition_penalty, bool)
                or self.repetition_penalty <= 0):
            raise ValueError(f"repetition_penalty must be a float > 0, got {self.repetition_penalty!r}")
        if self.do_sample:
            if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r}: for greedy "
                                 "decoding pass do_sample=False")
            if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
                raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
            if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
            if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                          or self.seed < 0):
                raise ValueError(f"seed must be an int >= 0 or None, got {self.seed!r}")
            if self.seed is None:
                object.__setattr__(self, "seed", int(torch.randint(0, 2**62, (1,)).item()))

    @property
    def plain_argmax(self) -> bool:
        return not self.do_sample and self.repetition_penalty == 1.0


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), by the registry's argmax op (on the CPU the C++ op reads bf16/fp16 as they are: torch's
    half-precision argmax there took 0.7 ms for 8 x 49k logits, and even its fp32 one 43 us for one row, ~1% of a
    quantized SmolLM2 step; AMD EPYC Zen 4, torch 2.13)."""
    return torch.ops.lookahead.argmax(logits)


class TokenChooser:
    """Turns logits of the first n rows into target tokens, each row with its own settings and the transformers
    processors in transformers' order: repetition penalty, temperature, top-k, top-p.

    `set_row(b, params, prompt, noise_row)` gives row b a request (noise_row: the row id its noise is keyed by;
    generate uses the row's index in its batch, the server 0, as a solo call); `clear_row(b)` frees it."""

    def __init__(self, max_rows: int, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self.params: list[SamplingParams | None] = [None] * max_rows
        self.sampled = torch.zeros(max_rows, dtype=torch.bool, device=device)
        self.temperature = torch.ones(max_rows, device=device)
        self.top_k = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.top_p = torch.ones(max_rows, device=device)
        self.penalty = torch.ones(max_rows, device=device)
        self.seeds = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.noise_rows = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.presence: torch.Tensor | None = None  # [max_rows, V] bool, made when a row has a penalty
        self._special: set[int] = set()  # rows that do not simply take the argmax

    def set_row(self, b: int, params: SamplingParams, prompt: list[int], noise_row: int = 0) -> None:
        self.params[b] = params
        self.sampled[b] = params.do_sample
        self.temperature[b] = float(params.temperature) if params.do_sample else 1.0
        self.top_k[b] = params.top_k if params.do_sample else 0
        self.top_p[b] = float(params.top_p) if params.do_sample else 1.0
        self.penalty[b] = float(params.repetition_penalty)
        seed = (params.seed or 0) % 2**64
        self.seeds[b] = seed - 2**64 if seed >= 2**63 else seed  # the hash reads the seed's 64 bits
        self.noise_rows[b] = noise_row
        if params.repetition_penalty != 1.0:
            if self.presence is None:
                with torch.inference_mode(False):  # updated in place by later calls, in inference_mode or not
                    self.presence = torch.zeros(len(self.params), self.vocab, dtype=torch.bool, device=self.device)
            self.presence[b] = False
            self.presence[b, torch.tensor(prompt, device=self.device)] = True
        if params.plain_argmax:
            self._special.discard(b)
        else:
            self._special.add(b)

    def clear_row(self, b: int) -> None:
        self.params[b] = None
        self._special.discard(b)
        self.sampled[b] = False
        self.penalty[b] = 1.0

    def plain_argmax(self, n: int, start: int = 0) -> bool:
        """Whether rows [start, start + n) all take the plain argmax (greedy without penalty): the step can be a
        CUDA graph."""
        return not any(start <= b < start + n for b in self._special)

    def targets(self, logits: torch.Tensor, node_index: torch.Tensor | None, positions: torch.Tensor | None,
                tokens: torch.Tensor, tree_mask: torch.Tensor | None, start: int = 0) -> torch.Tensor:
        """A step's target tokens [n, T]: logits [n, T, V], or [M, V] per verified node that node_index [n, T]
        spreads over the rows' trees (the plain argmax runs on the M nodes before they are spread); positions may be
        None where every row takes the plain argmax."""
        n = tokens.shape[0]
        if self.plain_argmax(n, start):
            greedy = greedy_tokens(logits)
            return greedy if node_index is None else greedy[node_index]
        return self(logits if node_index is None else logits[node_index], positions, tokens, tree_mask, start=start)

    def commit(self, b: int, tokens: list[int]) -> None:
        """Tokens appended to row b (for the repetition penalty)."""
        params = self.params[b]
        if params is not None and params.repetition_penalty != 1.0 and tokens:
            self.presence[b, torch.tensor(tokens, device=self.device)] = True

    def __call__(self, logits: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor | None = None,
                 tree_mask: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """logits [n, T, V] of rows [start, start + n), whose next tokens go to absolute positions [n, T] ->
        tokens [n, T]. tokens / tree_mask (None = chain) give each node's ancestors for the repetition penalty."""
        n, T, V = logits.shape
        if self.plain_argmax(n, start):
            return greedy_tokens(logits)
        rows = self.params[start:start + n]
        sel = slice(start, start + n)
        scores = logits.float()
        if any(p is not None and p.repetition_penalty != 1.0 for p in rows):
            seen = self.presence[sel, None, :].expand(n, T, V)
            if tokens is not None and T > 1:
                mask = tree_mask if tree_mask is not None else torch.ones(
                    n, T, T, dtype=torch.bool, device=logits.device).tril()
                ancestors = torch.zeros(n, T, V, device=logits.device).scatter_add_(
                    2, tokens[:, None, :].expand(n, T, T), mask.float())
                seen = seen | (ancestors > 0)
            penalty = self.penalty[sel, None, None]  # (n, 1, 1); 1.0 leaves a row's scores as they are
            penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
            scores = torch.where(seen, penalised, scores)
        greedy = scores.argmax(-1)
        if not any(p is not None and p.do_sample for p in rows):
            return greedy
        scores = scores / self.temperature[sel, None, None]
        top_k = self.top_k[sel]
        if any(p is not None and p.do_sample and p.top_k for p in rows):
            k = max(p.top_k for p in rows if p is not None and p.do_sample)
            values = scores.topk(min(k, V), dim=-1).values  # (n, T, k) descending
            kth = values.gather(-1, (top_k.clamp(1, min(k, V)) - 1)[:, None, None].expand(n, T, 1))
            scores = scores.masked_fill((scores < kth) & (top_k > 0)[:, None, None], float("-inf"))
        if any(p is not None and p.do_sample and p.top_p < 1.0 for p in rows):
            top_p = self.top_p[sel, None, None]
            sorted_scores, order = scores.sort(dim=-1)  # ascending, as transformers' TopPLogitsWarper
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = (cumulative <= 1 - top_p) & (top_p < 1.0)
            drop[..., -1] = False  # keep at least one token
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        noise = gumbel_noise(self.seeds[sel], self.noise_rows[sel], positions, V)
        return torch.where(self.sampled[sel, None], (scores + noise).argmax(-1), greedy)
