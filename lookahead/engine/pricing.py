"""What a step costs, measured: the batch-1 verify cost curve (the prior of the learned `drafting.drafter.StepCost`),
and the drafting gate.

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
import os
import statistics
import time
from collections.abc import Iterable

from lookahead.drafting.drafter import DecayedRatio
from lookahead.drafting.tree import TREE_BUCKETS
from lookahead.config import cache_dir, cuda_graphs_enabled

log = logging.getLogger("lookahead.engine.pricing")

_CONTEXT = 256  # committed tokens behind the measured verify steps
_RUNS = 5  # timed runs per size (median), after one warm-up run of that size
_DRIFT = 0.10  # re-measure when T=1 timed again at the end moved by more than this


def curve_key(model) -> str:
    """What a step's cost depends on: the model's shape, device, dtype, threads, CUDA graphs, and on CPU the host's
    CPU (its name and ISA), whether the C++ CPU ops run the step, which code path and which build of their sources
    (a kernel change is measured anew), and a GGUF model's block layouts and how many weights hold them (q/k/v as
    one weight or three)."""
    import torch

    from lookahead.kernels import cpu as cpu_ops

    c = model.config
    host = (f"|{cpu_ops.cpu_name()}|cpu_ops={cpu_ops.code_path() or 0}@{cpu_ops.build_id() or 0}"
            if model.device.type == "cpu" else "")
    quantized = [p.shape[-1] for p in model.parameters() if p.dtype == torch.uint8]  # GGUF block bytes
    host += f"|gguf_blocks={sorted(set(quantized))}x{len(quantized)}" if quantized else ""
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

    from lookahead.models.cache import KVCache

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
        log.info("quick verify cost prior in %.2f s: %s (refined by every step; `lookahead.engine.pricing.calibrate` "
                 "measures the full curve)", time.perf_counter() - t0,
                 ", ".join(f"T={T} {1e3 * c:.1f} ms" for T, c in curve.items()))
        model.state.cost_curves[quick_key] = curve
    return curve


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

    def __init__(self, keys: Iterable[tuple] = ()):
        """keys: the (rows, kind) pairs to make room for now (others are added as they come)."""
        self._arms: dict[tuple, _GateArms] = {key: _GateArms() for key in keys}

    def open(self, rows: int, kind=None) -> bool:
        """Whether the next step of `rows` rows drafts."""
        entry = self._arm(rows, kind)
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
        self._arm(rows, kind).learn(drafted, seconds, tokens)

    def _arm(self, rows: int, kind) -> _GateArms:
        entry = self._arms.get((rows, kind))
        if entry is None:
            entry = self._arms[rows, kind] = _GateArms()
        return entry

    def per_token(self, rows: int, kind=None) -> tuple[float | None, float | None]:
        """Measured seconds per committed token (drafting, plain) at this row count and kind (None: unmeasured)."""
        entry = self._arms.get((rows, kind))
        return (None, None) if entry is None else (entry.per_token(True), entry.per_token(False))


class _GateArms:
    """Steps of one row count and kind, with drafting and without: decayed sums of their seconds and tokens."""

    def __init__(self):
        self.sums = {drafted: DecayedRatio(1 - GATE_EMA) for drafted in (True, False)}  # seconds per token
        self.decisions = 0

    def learn(self, drafted: bool, seconds: float, tokens: int) -> None:
        if tokens > 0:
            self.sums[drafted].add(seconds, tokens)

    def per_token(self, drafted: bool) -> float | None:
        arm = self.sums[drafted]  # DecayedRatio.ratio() read in place: the gate asks it several times a step
        return arm.num / arm.den if arm.den > 0 else None
