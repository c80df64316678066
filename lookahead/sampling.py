"""Choosing each node's target token: greedy, or sampled losslessly over a whole draft tree.

Sampling is the Gumbel-max trick with counter-based noise: the noise for the token at absolute position p of
row b is a hash of (seed, b, p, vocab id), so it does not depend on how many tokens a step verified. Every
node at depth d of a tree predicts position cache_len + d + 1 and sees the same noise a plain step at that
position would see, so lookahead and plain sampling with one seed return the same tokens, and each emitted
token is an exact sample of the processed distribution. Processors that look at earlier tokens (repetition
penalty) see each node's own path: the committed tokens plus the node's ancestors.
"""

from __future__ import annotations

import torch

from lookahead.kernels import gumbel_noise


class TokenChooser:
    """Turns logits into target tokens, with the transformers processors: repetition penalty, temperature,
    top-k, top-p (in that order, as transformers applies them)."""

    def __init__(self, *, do_sample: bool, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
                 seed: int | None, vocab: int, prompts: list[list[int]], device: torch.device):
        if not isinstance(do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {do_sample!r}")
        if not isinstance(repetition_penalty, (int, float)) or repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a float > 0, got {repetition_penalty!r}")
        if do_sample:
            if not isinstance(temperature, (int, float)) or temperature <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}: for greedy "
                                 "decoding pass do_sample=False")
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
                raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
            if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
                raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
        self.do_sample = do_sample
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, float(top_p)
        self.penalty = float(repetition_penalty)
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None and do_sample else seed
        self.vocab = vocab
        self.rows = torch.arange(len(prompts), device=device)
        self.presence = None
        if self.penalty != 1.0:
            self.presence = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
            for b, prompt in enumerate(prompts):
                self.presence[b, torch.tensor(prompt, device=device)] = True

    @property
    def plain_argmax(self) -> bool:
        return not self.do_sample and self.presence is None

    def commit(self, b: int, tokens: list[int]) -> None:
        """Tokens appended to row b (for the repetition penalty)."""
        if self.presence is not None and tokens:
            self.presence[b, torch.tensor(tokens, device=self.presence.device)] = True

    def __call__(self, logits: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor | None = None,
                 tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, T, V] of nodes whose next token goes to absolute positions [B, T] -> tokens [B, T].
        tokens / tree_mask (None = chain) give each node's ancestors for the repetition penalty."""
        if self.plain_argmax:
            return logits.argmax(-1)
        scores = logits.float()
        B, T, V = scores.shape
        if self.presence is not None:
            seen = self.presence[:, None, :].expand(B, T, V)
            if tokens is not None and T > 1:
                mask = tree_mask if tree_mask is not None else torch.ones(
                    B, T, T, dtype=torch.bool, device=logits.device).tril()
                ancestors = torch.zeros(B, T, V, device=logits.device).scatter_add_(
                    2, tokens[:, None, :].expand(B, T, T), mask.float())
                seen = seen | (ancestors > 0)
            penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
            scores = torch.where(seen, penalised, scores)
        if not self.do_sample:
            return scores.argmax(-1)
        scores = scores / self.temperature
        if self.top_k:
            kth = scores.topk(min(self.top_k, V), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1)  # ascending, as transformers' TopPLogitsWarper
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.top_p
            drop[..., -1] = False  # keep at least one token
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        noise = gumbel_noise(self.seed, self.rows, positions, V)
        return (scores + noise).argmax(-1)
