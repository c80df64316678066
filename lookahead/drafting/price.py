"""The step price the drafter's size policy asks: `StepPrice.cost(rows, tokens)`; `CostModel`, the price of a fixed
batch-1 verify curve; `StepCost`, the price learned from the steps an engine runs (it times them and calls
`observe`; lookahead.engine.pricing measures the prior curve)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol


class StepPrice(Protocol):
    """The one interface a `Drafter` prices drafts with: `cost(rows, tokens)`, the cost of one step of `rows` rows
    that each verify a tree of `tokens` nodes (root included; 1 = a plain step), in any unit (only ratios are
    used). `CostModel` (a fixed batch-1 curve: replay, a bare Drafter), `StepCost` (learned from an engine's
    steps) and the vLLM proposer's linear step model implement it."""

    def cost(self, rows: int, tokens: int) -> float: ...


class CostModel:
    """A verify cost curve {tree nodes: cost}, in seconds or relative, priced relative to one token."""

    def __init__(self, curve: Mapping[int, float]):
        if not curve or any(int(T) < 1 or not float(c) > 0 for T, c in curve.items()):
            raise ValueError(f"a cost curve maps tree sizes >= 1 to costs > 0, got {dict(curve)!r}")
        self.sizes = sorted(int(T) for T in curve)
        base = float(curve[1]) if 1 in curve else float(curve[self.sizes[0]])
        self.rel = [float(curve[T]) / base for T in self.sizes]

    def __call__(self, nodes: float) -> float:
        """Relative cost of a verify over `nodes` tree nodes (all rows), linear between and beyond the points."""
        xs, ys = self.sizes, self.rel
        if nodes <= xs[0] or len(xs) == 1:
            return ys[0] if nodes <= xs[0] else ys[0] * nodes / xs[0]
        for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
            if nodes <= x1:
                return y0 + (y1 - y0) * (nodes - x0) / (x1 - x0)
        return ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (nodes - xs[-1])

    def cost(self, rows: int, tokens: int) -> float:
        """Relative cost of one step of `rows` rows that each verify a tree of `tokens` nodes (1, 1 = a plain
        one-row step). A batch-1 curve can only price the rows x tokens nodes as one row's."""
        return self(rows * tokens)

    def costs(self, rows: int, tokens: list[float]) -> list[float]:
        """cost(rows, t) for every t, in one call (the drafter prices a step's candidate sizes at once)."""
        return [self.cost(rows, t) for t in tokens]


class StepCost:
    """c(B, N): seconds of one engine step over B rows that verify N tokens in all (each row its own tree, its root
    included, and any prompt chunk riding in the step; B = N: a plain step), learned from the engine's own steps.
    `cost(rows, tokens)` takes the tokens per row (the StepPrice interface; N = rows x tokens, any real number).

    Every step the engine runs is a sample (`observe`): a (B, N) seen before is priced by its decayed mean
    (recent steps weigh most, so the model follows the machine: graphs on or off, load, heat). An unseen one is
    priced linearly between the nearest seen sizes of the same B, else by the prior, a batch-1 curve priced at N
    tokens, in the units of the nearest seen (B, N) (nearest in log B, then log N): the prior gives the shape, the
    steps the scale, so a batch's B rows that a batch-1
    curve underprices (attention per row over its own context) are corrected as soon as steps of that B have
    run. `cost(B, N / B)` is what `Drafter` calls."""

    def __init__(self, prior: Mapping[int, float], decay: float = 0.9):
        self.source = prior  # the curve it started from (a new one starts a new model)
        self.prior = CostModel(prior)
        self.decay = decay
        self.seen: dict[tuple[int, int], list[float]] = {}  # (B, N) -> [decayed count, decayed seconds]
        self._priced: dict[tuple[int, int], float] = {}  # cost()'s answers since the last observe

    def observe(self, rows: int, nodes: float, seconds: float) -> None:
        """A step of `rows` rows that verified `nodes` tokens per row (rows x nodes in all) took `seconds`."""
        if seconds > 0:
            entry = self.seen.setdefault((rows, max(1, round(rows * nodes))), [0.0, 0.0])
            entry[0] = entry[0] * self.decay + 1.0
            entry[1] = entry[1] * self.decay + seconds
            self._priced.clear()

    def costs(self, rows: int, tokens: list[float]) -> list[float]:
        """cost(rows, t) for every t, in one call (the drafter prices a step's candidate sizes at once)."""
        return [self.cost(rows, t) for t in tokens]

    def cost(self, rows: int, tokens: float) -> float:
        key = (rows, max(1, round(rows * tokens)))
        price = self._priced.get(key)
        if price is None:
            price = self._priced[key] = self._price(*key)
        return price

    def _price(self, rows: int, total: int) -> float:
        entry = self.seen.get((rows, total))
        if entry is not None:
            return entry[1] / entry[0]
        # between two seen sizes of the same row count: linear between them (the steps' own slope, which a
        # batch-1 prior underprices once the rows' tokens make the step compute-bound)
        below = max((n for r, n in self.seen if r == rows and n < total), default=None)
        above = min((n for r, n in self.seen if r == rows and n > total), default=None)
        if below is not None and above is not None:
            lo, hi = self._mean(rows, below), self._mean(rows, above)
            return lo + (hi - lo) * (total - below) / (above - below)
        prior = self.prior(total)
        if not self.seen:
            return prior
        # a plain step (one token a row) is priced from plain steps, a drafting one from drafting ones, where seen:
        # a step with trees also runs acceptance and compaction, and its cells are the ones the policy compares
        plain = total == rows
        kind = [k for k in self.seen if (k[1] == k[0]) == plain] or list(self.seen)
        near = min(kind, key=lambda k: (abs(math.log(k[0] / rows)), abs(math.log(k[1] / total))))
        return prior * self._mean(*near) / self.prior(near[1])

    def _mean(self, rows: int, total: int) -> float:
        count, seconds = self.seen[rows, total]
        return seconds / count
