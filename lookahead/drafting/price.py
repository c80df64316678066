"""The step price the drafter's size policy asks: `StepPrice.cost(rows, tokens)`, and `CostModel`, the price of a
fixed batch-1 verify curve. What a real step costs is measured by the engine (lookahead.engine.pricing)."""

from __future__ import annotations

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
