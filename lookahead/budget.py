"""Adaptive draft budget: pick each step's draft size to maximise expected tokens per second.

expected tokens/s of budget b = E[accepted tokens | b] / cost(verify of the tree b yields). The cost curve
is measured once per (model, device, dtype, threads) and cached on the model and under $LOOKAHEAD_CACHE;
the acceptance side is a running average per budget, with an optimism bonus so that budgets not tried lately
get tried again (drafts improve as the trie warms up). Budget 0 is a plain one-token step.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from lookahead.cache import KVCache
from lookahead.config import LookaheadConfig
from lookahead.draft import DRAFT_BUCKETS, bucket_size

_CONTEXT = 256  # committed tokens behind the measured verify steps
_REPEATS = 3  # timed runs per size on CPU (hundreds of ms each); CUDA replays take 10x as many



def cache_dir() -> Path:
    return Path(os.environ.get("LOOKAHEAD_CACHE", Path.home() / ".cache" / "lookahead"))


def _curve_key(model) -> str:
    w = model.tok_embeddings.weight
    c = model.config
    return (f"{c.model_type}-{c.n_layers}x{c.dim}-h{c.n_heads}-kv{c.n_kv_heads}-v{c.vocab_size}|{w.device.type}|"
            f"{str(w.dtype).removeprefix('torch.')}|threads={torch.get_num_threads()}")


@torch.inference_mode()
def measure_cost_curve(model, sizes: list[int]) -> dict[int, float]:
    """Seconds of one verify forward with a tree of T nodes (a chain), for each T in sizes, batch 1."""
    cfg, w = model.config, model.tok_embeddings.weight
    cache = KVCache(cfg.n_layers, 1, cfg.n_kv_heads, _CONTEXT + max(sizes), cfg.head_dim, w.dtype, w.device)
    cache.lens.fill_(_CONTEXT)
    curve = {}
    for T in sizes:
        tokens = torch.zeros(1, T, dtype=torch.long, device=w.device)
        depths = torch.arange(T, device=w.device)[None]
        run = lambda: model.verify(tokens, depths, cache, None)  # noqa: E731
        if w.is_cuda and os.environ.get("LOOKAHEAD_CUDA_GRAPHS", "1") != "0":
            run()  # compiles the kernels; the steps replay CUDA graphs, so time a replay
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model.verify(tokens, depths, cache, None)
            run = graph.replay
        times = []
        for _ in range(_REPEATS * (10 if w.is_cuda else 1) + 1):
            if w.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if w.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        curve[T] = sorted(times[1:])[len(times[1:]) // 2]  # median, the first run is a warm-up
    return curve


def cost_curve(model, max_tree: int) -> dict[int, float]:
    """The cached cost curve over the draft buckets up to max_tree nodes, measured when missing."""
    sizes = [T for T in DRAFT_BUCKETS if T <= max_tree]
    key = _curve_key(model)
    state = model._lookahead_state.setdefault("cost_curves", {})
    curve = state.get(key)
    if curve is None or not all(T in curve for T in sizes):
        path = cache_dir() / "cost_curves.json"
        try:
            saved = {k: {int(T): float(s) for T, s in v.items()} for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            saved = {}
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
        state[key] = curve
    return curve


class DraftBudget:
    """Chooses the number of draft nodes per step from the cost curve and running acceptance."""

    def __init__(self, curve: dict[int, float], max_draft: int, stats: dict):
        self.curve = curve
        self.sizes = sorted(curve)
        self.candidates = [T - 1 for T in self.sizes if T - 1 <= max_draft]
        self.stats = stats  # budget -> [steps, mean accepted tokens, mean draft nodes actually built]
        self.t = sum(s[0] for s in stats.values()) + 1

    @classmethod
    def for_model(cls, model, cfg: LookaheadConfig) -> "DraftBudget":
        max_tree = bucket_size(cfg.decoding_length + 1)
        curve = cost_curve(model, max_tree)
        stats = model._lookahead_state.setdefault("acceptance", {})
        return cls(curve, cfg.decoding_length, stats)

    def cost(self, total_nodes: float) -> float:
        """Verify seconds for a step of total_nodes nodes (all rows), interpolated / extrapolated linearly."""
        xs, ys = self.sizes, [self.curve[T] for T in self.sizes]
        if total_nodes <= xs[0]:
            return ys[0]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if total_nodes <= x1:
                return y0 + (y1 - y0) * (total_nodes - x0) / (x1 - x0)
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else ys[-1] / xs[-1]
        return ys[-1] + slope * (total_nodes - xs[-1])

    def choose(self, rows: int) -> int:
        """The budget (draft nodes per row) with the best optimistic tokens per second for `rows` rows."""
        best, best_score = 0, -1.0
        for b in self.candidates:
            steps, accepted, built = self.stats.get(b, (0, 1.0 + b ** 0.5, b))
            bonus = 0.0 if b == 0 else math.sqrt(2.0 * math.log(self.t) / (steps + 1))
            score = (accepted + bonus) * rows / self.cost(rows * (1 + built))
            if score > best_score:
                best, best_score = b, score
        return best

    def update(self, budget_used: int, accepted: int, built: int | None = None) -> None:
        """Record one row-step: the draft budget asked for, tokens accepted (bonus included), nodes built."""
        b = max((c for c in self.candidates if c <= budget_used), default=0)
        steps, mean_acc, mean_built = self.stats.get(b, (0, 0.0, 0.0))
        alpha = max(1.0 / (steps + 1), 0.05)  # running mean, then an exponential average that tracks the trie
        self.stats[b] = (steps + 1, mean_acc + alpha * (accepted - mean_acc),
                         mean_built + alpha * ((budget_used if built is None else built) - mean_built))
        self.t += 1
