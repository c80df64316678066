"""What a step costs: the batch-1 verify cost curve, and the engine's cost model of batched steps learned from
its own steps.

The curve (seconds of one verify forward by tree size) is measured once per model, device, dtype, threads and
CUDA-graph setting, cached on the model (`model.state.cost_curves`) and under $LOOKAHEAD_CACHE;
`calibrate(model)` measures it in full (seconds on a CPU) outside any timed call; `prior_curve(model)` takes the
cached one or, when there is none, measures a quick one (three sizes, 9 forward passes) instead of hiding the full
measurement inside a user's first call. `StepCost` prices a step of B rows x T nodes, c(B, T), starting from
that prior and following every step the engine really runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Mapping
from typing import Protocol

from lookahead.draft import TREE_BUCKETS
from lookahead.settings import cache_dir, cuda_graphs_enabled

log = logging.getLogger("lookahead.cost")

_CONTEXT = 256  # committed tokens behind the measured verify steps
_RUNS = 5  # timed runs per size (median), after one warm-up run of that size
_DRIFT = 0.10  # re-measure when T=1 timed again at the end moved by more than this


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


def curve_key(model) -> str:
    """What a step's cost depends on: the model's shape, device, dtype, threads, CUDA graphs, and on CPU the host's
    CPU (its name and ISA) and whether the C++ CPU ops run the step."""
    import torch

    from lookahead.kernels import cpu as cpu_ops

    c = model.config
    host = f"|{cpu_ops.cpu_name()}|cpu_ops={int(cpu_ops.available())}" if model.device.type == "cpu" else ""
    blocks = sorted({p.shape[-1] for p in model.parameters() if p.dtype == torch.uint8})  # GGUF block bytes
    host += f"|gguf_blocks={blocks}" if blocks else ""
    return (f"{c.model_type}-{c.n_layers}x{c.dim}-h{c.n_heads}-kv{c.n_kv_heads}-d{c.head_dim}-v{c.vocab_size}|"
            f"{model.device.type}|{str(model.dtype).removeprefix('torch.')}|threads={torch.get_num_threads()}|"
            f"graphs={int(model.device.type == 'cuda' and cuda_graphs_enabled())}{host}")


def measure_cost_curve(model, sizes: list[int], repeats: int = _RUNS, retry: bool = True) -> dict[int, float]:
    """Median seconds of one verify forward over a chain of T nodes behind 256 committed tokens, batch 1, for
    each T: a warm-up run before each size, then the median of 5. The whole curve is measured again (once) if
    T=1 timed again at the end moved by more than 10% (a first size that absorbed a one-time cost) or a size
    came out cheaper than 80% of a smaller one (noise: more nodes never cost less); what remains is made
    non-decreasing."""
    import torch

    from lookahead.cache import KVCache

    cfg = model.config
    cache = KVCache(cfg.n_layers, 1, cfg.n_kv_heads, _CONTEXT + max(sizes), cfg.head_dim, model.dtype, model.device)
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def runner(T: int):
        tokens = torch.zeros(1, T, dtype=torch.long, device=model.device)
        depths = torch.arange(T, device=model.device)[None]
        run = lambda: model.verify(tokens, depths, cache, None)  # noqa: E731
        if cuda and cuda_graphs_enabled():  # the decode steps replay CUDA graphs: time a replay
            run()
            sync()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model.verify(tokens, depths, cache, None)
            run = graph.replay
        return run

    def timed(run) -> float:
        times = []
        for _ in range(repeats * (10 if cuda else 1)):
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    with torch.inference_mode():
        cache.lens.fill_(_CONTEXT)
        runs = {T: runner(T) for T in sizes}
        for _ in range(2 if retry else 1):  # a second measurement when the first one drifted or dipped
            curve = {}
            for T in sizes:
                runs[T]()  # warm-up of this size
                curve[T] = timed(runs[T])
            again = timed(runs[sizes[0]])
            dips = any(curve[b] < 0.8 * curve[a] for a, b in zip(sizes, sizes[1:]))
            if abs(again - curve[sizes[0]]) <= _DRIFT * curve[sizes[0]] and not dips:
                break
    floor = 0.0
    for T in sizes:
        floor = curve[T] = max(curve[T], floor)
    return curve


def _load_saved(path) -> dict[str, dict[int, float]]:
    """The cost curves file; anything unreadable or malformed counts as empty (it is re-measured, not trusted)."""
    try:
        raw = json.loads(path.read_text())
        saved = {str(k): {int(T): float(s) for T, s in v.items()} for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}
    return {k: v for k, v in saved.items() if v and all(T >= 1 and s > 0 for T, s in v.items())}


def calibrate(model, max_tree: int = 64) -> dict[int, float]:
    """The model's verify cost curve over the tree buckets up to max_tree nodes: from the model's state, else
    from $LOOKAHEAD_CACHE/cost_curves.json, else measured now (seconds on CPU) and saved. Call it once after
    loading, outside anything timed; generate() calls it when the curve is missing."""
    sizes = [T for T in TREE_BUCKETS if T <= max(1, max_tree)]
    key = curve_key(model)
    curve = model.state.cost_curves.get(key)
    if curve is not None and all(T in curve for T in sizes):
        return curve
    path = cache_dir() / "cost_curves.json"
    saved = _load_saved(path)
    curve = saved.get(key)
    if curve is None or not all(T in curve for T in sizes):
        curve = {**(curve or {}), **measure_cost_curve(model, sizes)}
        saved[key] = curve
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(saved, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache dir only costs a re-measurement next time
    model.state.cost_curves[key] = curve
    return curve


QUICK_SIZES = (1, 8, 32)  # tree sizes of the quick prior; the other buckets are interpolated (and extrapolated)


def prior_curve(model, max_tree: int = 64) -> dict[int, float]:
    """A batch-1 curve to start a StepCost from, without a hidden 20 s measurement: the full curve when the model or
    $LOOKAHEAD_CACHE has one (from `calibrate`), else a quick one (sizes 1, 8, 32: one warm-up and the mean of 2
    each), logged and kept on the model, never written to disk as if it
    were the full curve: the engine's steps refine it from there."""
    key = curve_key(model)
    for curve in (model.state.cost_curves.get(key), _load_saved(cache_dir() / "cost_curves.json").get(key)):
        if curve is not None:  # sizes beyond it are priced by extrapolation (CostModel)
            model.state.cost_curves[key] = curve
            return curve
    quick_key = key + "|quick"
    curve = model.state.cost_curves.get(quick_key)
    if curve is None:
        t0 = time.perf_counter()
        curve = measure_cost_curve(model, [T for T in QUICK_SIZES if T <= max(1, max_tree)] or [1], repeats=2,
                                   retry=False)
        log.info("quick verify cost prior in %.2f s: %s (refined by every step; `lookahead.cost.calibrate` "
                 "measures the full curve)", time.perf_counter() - t0,
                 ", ".join(f"T={T} {1e3 * c:.1f} ms" for T, c in curve.items()))
        model.state.cost_curves[quick_key] = curve
    return curve


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


# The drafting gate: every GATE_PROBE-th decision of a row count tries the arm that looked worse; each arm's sums
# of seconds and tokens decay by 1 - GATE_EMA per step it measures.
GATE_PROBE = 8
GATE_EMA = 0.1


class DraftGate:
    """Drafting on or off, by what steps measurably cost per committed token. A price model picks nodes by the
    step's device time, but drafting also costs host time on every row and rests on calibrated guesses; so the
    gate keeps, per row count and kind of step (any hashable: the engine tells steps that carry prompt chunks from
    pure decode steps), the measured seconds per committed token of steps that drafted and of steps that did not
    (decayed sums of seconds and of tokens: a ratio of sums, since a mean of per-step ratios would overweigh steps
    that accepted little) and runs the cheaper arm, trying the other every GATE_PROBE-th decision so both stay
    measured. A row count measured one way or not at all follows the nearest one of its kind measured both ways;
    with nothing measured it drafts, then tries a plain step. The engine and the vLLM proposer both gate with it."""

    def __init__(self):
        self._arms: dict[tuple, _GateArms] = {}

    def open(self, rows: int, kind=None) -> bool:
        """Whether the next step of `rows` rows drafts."""
        entry = self._arms.setdefault((rows, kind), _GateArms())
        count = entry.decisions
        entry.decisions += 1
        probe = count % GATE_PROBE == GATE_PROBE - 1
        on, off = entry.per_token(True), entry.per_token(False)
        if on is None or off is None:
            known = [k for k, e in self._arms.items() if k[1] == kind and e.per_token(True) is not None
                     and e.per_token(False) is not None]
            if not known:
                return off is not None or not probe  # measure drafting first, then plain
            near = self._arms[min(known, key=lambda k: (abs(k[0] - rows), k[0]))]
            better = near.per_token(True) <= near.per_token(False)
            if on is None and off is None:
                return better != probe
            return on is None if probe else better  # a probe measures the arm this row count lacks
        return (on <= off) != probe

    def learn(self, rows: int, kind, drafted: bool, seconds: float, tokens: int) -> None:
        """A step of `rows` rows of this kind, with drafts or without, took `seconds` and committed `tokens`."""
        self._arms.setdefault((rows, kind), _GateArms()).learn(drafted, seconds, tokens)

    def per_token(self, rows: int, kind=None) -> tuple[float | None, float | None]:
        """Measured seconds per committed token (drafting, plain) at this row count and kind (None: unmeasured)."""
        entry = self._arms.get((rows, kind))
        return (None, None) if entry is None else (entry.per_token(True), entry.per_token(False))


class _GateArms:
    """Steps of one row count and kind, with drafting and without: decayed sums of their seconds and tokens."""

    def __init__(self):
        self.sums = {True: [0.0, 0.0], False: [0.0, 0.0]}  # drafted -> [seconds, tokens]
        self.decisions = 0

    def learn(self, drafted: bool, seconds: float, tokens: int) -> None:
        if tokens > 0:
            arm = self.sums[drafted]
            arm[0] = arm[0] * (1 - GATE_EMA) + seconds
            arm[1] = arm[1] * (1 - GATE_EMA) + tokens

    def per_token(self, drafted: bool) -> float | None:
        seconds, tokens = self.sums[drafted]
        return seconds / tokens if tokens > 0 else None
