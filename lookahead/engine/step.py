"""The device side of one decode step, run eagerly or replayed from a CUDA graph.

`verify_step` runs one step over a packed batch (`drafting.tree.pack_ragged`): it verifies every row's draft tree (a
single root node for plain decoding) and any prompt chunk riding in the step, chooses the target tokens, accepts the
longest correct path, compacts the KV cache and advances the committed lengths. It only launches device work: the
host reads its small output once per step (the engine's commit reads each row of it).

On CUDA, `StepGraphs` captures the step of a padded batch (every row a tree of one bucket, no chunks) per (rows,
tree bucket, top-k) the first time it runs and replays it after: a 30-layer model's step is hundreds of small
launches, which a replay turns into one. Inputs go through static buffers; the KV cache and its lengths are the
model's own (static) tensors. Graphs are used for greedy decoding only: a sampled step bakes its seed into the
captured noise.

`nvtx_range` names the parts of a step on the Nsight timeline (LOOKAHEAD_NVTX=1, CUDA) and in torch.profiler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from lookahead import kernels
from lookahead.config import cuda_graphs_enabled
from lookahead.drafting.tree import DraftBatch, RaggedBatch
from lookahead.models.cache import KVCache

NVTX = os.environ.get("LOOKAHEAD_NVTX") == "1" and torch.cuda.is_available()


@contextlib.contextmanager
def _nvtx(name: str):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


# `with nvtx_range(name):` marks a part of the step on the Nsight timeline (LOOKAHEAD_NVTX=1, CUDA) or else in
# torch.profiler's trace: torch's C++ record-function guard records only while a profiler runs and costs ~0.3 us
# otherwise (torch.profiler.record_function: ~6 us, AMD EPYC Zen 4, torch 2.13), so it is bound once, here.
nvtx_range = _nvtx if NVTX else getattr(torch._C._profiler, "_RecordFunctionFast", torch.profiler.record_function)


def accepted_tokens(targets: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """[B, T]: the accepted draft tokens followed by the bonus token, then junk. Node path[j + 1] was accepted
    because its token is the target of its parent path[j], so the n new tokens are the targets of path[0 .. n-1]."""
    return targets.gather(1, path.clamp(min=0))


def verify_step(model, cache: KVCache, chooser, batch: RaggedBatch, active: torch.Tensor, top_k: int = 0,
                start: int = 0) -> torch.Tensor:
    """One decode step over a packed batch -> [B, 1 + Td (+ Td * top_k)] int64: per row the number n of accepted
    nodes (root included), the n new tokens (the accepted draft tokens and the bonus token) padded to Td, then with
    top_k > 0 every node's top-k next tokens (for recycled drafts). A row without a tree (its prompt goes on next
    step, or a free row) reports 0 tokens; rows with active[b] = 0 are computed but do not advance.

    A ragged batch runs the linear layers over its N flat tokens and attention per row over its prefix, its chain and
    its own tree, and the LM head over the tree nodes only; chains are committed as they are (cache.lens += shift).
    A uniform batch (padded rows, no chains) runs `model.verify` on fixed shapes, which a CUDA graph can replay.
    `cache` may be a row range of a bigger cache (`KVCache.rows`); chooser: the engine's TokenChooser, whose rows
    [start, start + B) these are."""
    tree = batch.tree
    B, Td = tree.tokens.shape
    with nvtx_range("verify"):
        if batch.uniform:
            logits = model.verify(tree.tokens, tree.depths, cache, tree.tree_mask)  # (B, Td, V)
            node_index = None  # already [B, Td, ...]
        else:
            logits = model.verify_ragged(batch.tokens, batch.rows, batch.nodes, batch.depths, cache, batch.mask,
                                         batch.logit_index) if batch.num_tokens else None  # (M, V)
            if batch.num_tokens > batch.num_logits:  # prompt chunks rode in the step
                cache.lens += batch.shift  # the chains' K/V are in place: the tree's root now sits at slot cache.lens
            if not batch.num_logits:  # only chunks of prompts that go on: nothing to choose
                return torch.zeros(B, 1 + Td * (1 + top_k), dtype=torch.long, device=cache.lens.device)
            node_index = batch.tree_index  # [M, ...] -> [B, Td, ...]: padding reads node 0's
        # (B, Td) where each node's next token goes: only a sampler or a penalty reads it
        positions = None if chooser.plain_argmax(B, start) else cache.lens[:, None] + tree.depths + 1
        targets = chooser.targets(logits, node_index, positions, tree.tokens, tree.tree_mask, start=start)
    live = active * batch.has_tree  # rows whose tree is accepted
    if Td == 1:  # plain steps: the root alone is accepted, its K/V already in place
        num, new = batch.has_tree, targets
        cache.lens += live
    else:
        with nvtx_range("accept"):
            path, num = torch.ops.lookahead.accept_longest_path(tree.tokens, tree.parents, targets)
            new = accepted_tokens(targets, path)
        with nvtx_range("compact"):
            torch.ops.lookahead.compact_kv(cache.buffer, cache.lens, path, num)
            cache.lens += num * live
        num = num * batch.has_tree
    parts = [num[:, None], new]
    if top_k:
        top = torch.ops.lookahead.top_k_indices(logits, top_k)
        parts.append((top if node_index is None else top[node_index]).flatten(1))  # (B, Td * top_k)
    return torch.cat(parts, dim=1)


def graphs_enabled(model) -> bool:
    """CUDA graphs for a model: on CUDA with the Triton kernels (the torch references of accept and compact read
    values on the host), unless LOOKAHEAD_CUDA_GRAPHS=0. A step also needs every row to take the plain argmax."""
    return model.device.type == "cuda" and kernels.HAS_TRITON and cuda_graphs_enabled()


class StepGraphs:
    """Captured steps of one engine, keyed by (rows, tree size, top-k): each row count n has one cache view
    (the engine's rows [0, n)), so a key always replays onto the same buffers.

    The first call of a key runs the step eagerly on fresh static buffers (this compiles the Triton kernels for
    exactly those buffers) and then captures it; later calls copy their inputs into the static buffers and
    replay. All graphs share one memory pool: they are replayed one at a time on one stream.
    """

    def __init__(self, model):
        self.model = model
        self.exact = model.exact  # the kernels the graphs replay (model.set_exact)
        self.pool = torch.cuda.graph_pool_handle()
        self.entries: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    def run(self, cache: KVCache, chooser, batch: RaggedBatch, active: torch.Tensor, top_k: int = 0) -> torch.Tensor:
        """verify_step of a uniform batch, replayed from the graph of its shape (captured at its first call)."""
        tree = batch.tree
        inputs = (tree.tokens, tree.parents, tree.depths, tree.tree_mask, batch.has_tree, active)
        key = tuple(tuple(t.shape) for t in inputs) + (top_k,)
        entry = self.entries.get(key)
        if entry is not None:
            graph, static, out = entry
            for dst, src in zip(static, inputs):
                if dst is not src:
                    dst.copy_(src)
            graph.replay()
            return out
        static = [t.clone() for t in inputs]
        fixed = dataclasses.replace(batch, tree=DraftBatch(*static[:4]), has_tree=static[4])
        result = verify_step(self.model, cache, chooser, fixed, static[5], top_k=top_k).clone()  # the real step
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):  # records the launches, runs nothing
            out = verify_step(self.model, cache, chooser, fixed, static[5], top_k=top_k)
        self.entries[key] = (graph, static, out)
        return result
