"""Draft trees: one row's candidate continuations laid out for a single verify pass.

Node 0 is the root (the last committed token); nodes follow in DFS pre-order, so parents[i] < i and every
subtree is a contiguous run. Node i sits at position cache_len + depth[i]. Trees are padded to a bucket size
so a step has one of a few static shapes; padding nodes have parent -1 and are never accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lookahead.config import LAYOUTS, MAX_TREE_NODES

# Tree sizes (root included) a step is padded to: few static shapes for CUDA graphs, steps of <= 1.5x so
# padding wastes at most a third of a tree.
TREE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, MAX_TREE_NODES)


def bucket_size(n: int) -> int:
    """The smallest bucket holding n nodes (root included)."""
    for b in TREE_BUCKETS:
        if b >= n:
            return b
    raise ValueError(f"a draft tree holds at most {MAX_TREE_NODES} nodes (root included), got {n}")


@dataclass
class DraftTree:
    """One row's tree, root included, unpadded: tokens[i], parents[i] (-1 for the root), depths[i]."""
    tokens: list[int]
    parents: list[int]
    depths: list[int]

    @property
    def num_draft(self) -> int:
        return len(self.tokens) - 1


def build_draft(root_token: int, node_tokens: list[int], node_parents: list[int], layout: str = "hier",
                budget: int | None = None) -> DraftTree:
    """A tree from retrieved nodes (DFS pre-order, parents indexing the tree with 0 = root).

    "hier" keeps the trie's shape (shared prefixes once); "par" lays every root-to-leaf branch out as its own
    chain (shared prefixes repeated), as in the Lookahead paper's parallel layout, cut to `budget` nodes.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if len(node_tokens) != len(node_parents):
        raise ValueError(f"{len(node_tokens)} tokens but {len(node_parents)} parents")
    parents = [-1] + list(node_parents)
    depths = [0] * len(parents)
    for i in range(1, len(parents)):
        if not 0 <= parents[i] < i:
            raise ValueError(f"node {i} has parent {parents[i]}: parents must point at an earlier node "
                             "(DFS pre-order, 0 = root)")
        depths[i] = depths[parents[i]] + 1
    tokens = [root_token] + list(node_tokens)
    if layout == "hier":
        tree = DraftTree(tokens, parents, depths)
    else:
        tree = _parallel(tokens, parents)
    if budget is not None and tree.num_draft > budget:
        keep = budget + 1  # pre-order prefixes are closed under parents, so the cut is still a tree
        tree = DraftTree(tree.tokens[:keep], tree.parents[:keep], tree.depths[:keep])
    return tree


def preorder(nodes: Sequence[tuple]) -> tuple[list[int], list[int]]:
    """Best-first (token, parent, ...) nodes, parent indexing the list (-1 = root) -> (tokens, parents) in DFS
    pre-order with parents indexing the tree (0 = root); siblings keep their best-first order."""
    children: list[list[int]] = [[] for _ in range(len(nodes) + 1)]  # slot 0 = the root, i + 1 = nodes[i]
    for i, node in enumerate(nodes):
        children[node[1] + 1].append(i + 1)
    tokens, parents = [], []
    stack = [(c, 0) for c in reversed(children[0])]
    while stack:
        slot, parent_index = stack.pop()
        tokens.append(nodes[slot - 1][0])
        parents.append(parent_index)
        index = len(tokens)
        stack.extend((c, index) for c in reversed(children[slot]))
    return tokens, parents


def draft_tree(root_token: int, nodes: Sequence[tuple], layout: str = "hier") -> DraftTree:
    """The tree of best-first (token, parent, ...) nodes (parent indexing the list, -1 = the root) under the root
    token: `preorder`, then `build_draft`."""
    tokens, parents = preorder(nodes)
    return build_draft(root_token, tokens, parents, layout=layout, budget=len(tokens))


def trees_of_batch(proposer, layout: str, request_ids, contexts, batch_size: int | None = None,
                   extra_tokens: int = 0) -> list[DraftTree | None]:
    """A proposer's `draft_batch` laid out as the rows' trees (root = the context's last token; None for a None
    context): what `Drafter.draft_trees` returns, for any other proposer."""
    drafts = proposer.draft_batch(request_ids, contexts, batch_size=batch_size, extra_tokens=extra_tokens)
    return [None if ctx is None else build_draft(int(ctx[-1]), tokens, parents, layout=layout, budget=len(tokens))
            for ctx, (tokens, parents) in zip(contexts, drafts)]


def _parallel(tokens: list[int], parents: list[int]) -> DraftTree:
    """Each leaf's root-to-leaf path as a separate chain hanging off the root."""
    has_child = [False] * len(tokens)
    for p in parents[1:]:
        has_child[p] = True
    out_t, out_p, out_d = [tokens[0]], [-1], [0]
    for leaf in (i for i in range(1, len(tokens)) if not has_child[i]):
        chain = []
        node = leaf
        while node > 0:
            chain.append(tokens[node])
            node = parents[node]
        prev = 0
        for depth, tok in enumerate(reversed(chain), start=1):
            out_t.append(tok)
            out_p.append(prev)
            out_d.append(depth)
            prev = len(out_t) - 1
    return DraftTree(out_t, out_p, out_d)


@dataclass
class DraftBatch:
    tokens: torch.Tensor     # [B, T] int64, padding 0
    parents: torch.Tensor    # [B, T] int64, -1 for roots and padding
    depths: torch.Tensor     # [B, T] int64
    tree_mask: torch.Tensor  # [B, T, T] bool, i sees j iff j is i or an ancestor of i


def ancestor_mask(parents: np.ndarray, max_depth: int) -> np.ndarray:
    """[B, T] parents (-1 for roots and padding) -> [B, T, T] bool, i sees j iff j is i or an ancestor of i, by
    pointer doubling: after round k every node sees its ancestors closer than 2^k and points at the one 2^k up
    (a root or padding node points at itself, so padding sees only itself). log2(depth) vectorised rounds, no
    loop over nodes."""
    B, T = parents.shape
    rows, nodes = np.arange(B)[:, None], np.arange(T)[None, :]  # (B, 1), (1, T)
    up = np.where(parents >= 0, parents, nodes)  # (B, T)
    mask = np.zeros((B, T, T), dtype=np.bool_)
    mask[rows, nodes, nodes] = True
    span = 1
    while span <= max_depth:
        mask |= mask[rows, up]  # (B, T, T): what the node 2^k up sees
        up = up[rows, up]
        span *= 2
    return mask


@dataclass
class RaggedBatch:
    """One step's work, every row's tokens flattened into one dimension [N] (no padding to the longest row).

    Row b carries a causal chain of `shift[b]` prompt tokens (a chunk of a prefill riding in the step; empty for a
    decoding row) and then a tree under its last token (the row's last committed token and its drafts; none for a
    row whose prompt goes on in a later step, or a free row). Node i of a row sits at slot cache.lens + i; the chain
    is committed as it is (cache.lens += shift), the tree is accepted and compacted as a draft tree.

    The tree part is also laid out padded, [B, Td] (Td = the largest tree), for acceptance, the chooser and the
    compaction, which cost O(B * Td) and nothing per layer. uniform: every row a tree of Td nodes and no chains (which a
    CUDA graph replays); only `pack_ragged(pad=True)` makes such batches."""
    tokens: torch.Tensor       # [N] int64
    rows: torch.Tensor         # [N] int64: the token's row
    nodes: torch.Tensor        # [N] int64: its node index in the row (slot offset from cache.lens)
    depths: torch.Tensor       # [N] int64: its position offset from cache.lens
    mask: torch.Tensor         # [N, W] bool: token n sees node j of its row
    logit_index: torch.Tensor  # [M] int64: the flat index of every tree node, row by row (the LM head's rows)
    tree: DraftBatch           # the trees padded to [B, Td] (a free or mid-prefill row: one padding root)
    tree_index: torch.Tensor   # [B, Td] int64: each tree node's index in logit_index (padding: 0)
    shift: torch.Tensor        # [B] int64: chain tokens before the tree
    has_tree: torch.Tensor     # [B] int64: 1 where the row has a tree (it gets tokens this step)
    num_tokens: int            # N, host side
    num_logits: int            # M, host side
    uniform: bool


_ROOT_BATCHES: dict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = {}


def _pack_roots(roots: list[int], device: torch.device | str) -> RaggedBatch:
    """pack_ragged of B rows that each verify their root alone (every plain step, and every step the drafter sits
    out): the same batch from the tokens and tensors kept per (B, device), which the step only reads. The general
    packing took ~150 us of a quantized SmolLM2 step of ~5 ms (34 us in a tight loop: its numpy and torch calls run
    several times slower between two forwards)."""
    B, device = len(roots), torch.device(device)
    const = _ROOT_BATCHES.get((B, device))
    if const is None:
        const = _ROOT_BATCHES[B, device] = (
            torch.arange(B, device=device), torch.zeros(B, dtype=torch.long, device=device),
            torch.ones(B, dtype=torch.long, device=device), torch.full((B, 1), -1, dtype=torch.long, device=device),
            torch.ones(B, 1, 1, dtype=torch.bool, device=device))
    index, zeros, ones, parents, sees = const
    tokens = torch.tensor(roots, dtype=torch.long, device=device)
    tree = DraftBatch(tokens.view(B, 1), parents, zeros.view(B, 1), sees)
    return RaggedBatch(tokens, index, zeros, zeros, sees.view(B, 1), index, tree, index.view(B, 1), zeros, ones, B, B,
                       False)


def pack_ragged(chains: list[list[int]], trees: list[DraftTree | None], device: torch.device | str,
                pad: bool = False) -> RaggedBatch:
    """Flatten every row's chain and tree into one step (see RaggedBatch) and move it to the device in two copies.
    pad: pad every tree to one bucket and give a free row a padding root, with no chains allowed (the fixed shapes
    a CUDA graph replays, `uniform`); a batch with a chain is never padded. Rows that each verify their root alone
    take `_pack_roots`, the same batch built faster."""
    B = len(trees)
    if len(chains) != B:
        raise ValueError(f"{len(chains)} chains for {B} rows")
    pad = pad and not any(chains)
    if B and not pad and not any(chains) and all(t is not None and len(t.tokens) == 1 and t.depths[0] == 0
                                                 for t in trees):
        return _pack_roots([t.tokens[0] for t in trees], device)
    if B == 1 and not pad and not chains[0] and trees[0] is not None:
        return _pack_tree(trees[0], device)
    return _pack(chains, trees, device, pad)


def _pack_tree(tree: DraftTree, device: torch.device | str) -> RaggedBatch:
    """pack_ragged of one row's tree and nothing else (a decode step of batch 1): `_pack`'s batch in one host
    tensor of ints and one mask, built from the tree's lists (the general packing took ~0.2 ms of a quantized
    SmolLM2 step of ~5 ms between two forwards, 2026-12-07)."""
    T = len(tree.tokens)
    anc = np.zeros((T, T), dtype=np.bool_)  # node i sees its parent's ancestors and itself (parents[i] < i)
    for i, p in enumerate(tree.parents):
        if p >= i:  # not in topological order: the general packing's pointer doubling
            return _pack([[]], [tree], device, False)
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
    nodes = list(range(T))
    # tokens, rows, nodes, depths [N = T]; the tree's tokens, parents, depths, index [1, T]; shift, has_tree [1];
    # logit_index [T]
    ids, par, dep = list(tree.tokens), list(tree.parents), list(tree.depths)
    flat = torch.tensor(ids + [0] * T + nodes + dep + ids + par + dep + nodes + [0, 1] + nodes,
                        dtype=torch.long).to(device)
    mask = torch.from_numpy(anc).to(device)
    tokens, rows, node, depths, t_tokens, t_parents, t_depths, t_index = flat[:8 * T].view(8, T)
    tree_batch = DraftBatch(t_tokens.view(1, T), t_parents.view(1, T), t_depths.view(1, T), mask.view(1, T, T))
    return RaggedBatch(tokens, rows, node, depths, mask, flat[8 * T + 2:], tree_batch, t_index.view(1, T),
                       flat[8 * T:8 * T + 1], flat[8 * T + 1:8 * T + 2], T, T, False)


def _pack(chains: list[list[int]], trees: list[DraftTree | None], device: torch.device | str,
          pad: bool) -> RaggedBatch:
    """pack_ragged's general case."""
    B = len(trees)
    sizes = [len(t.tokens) if t is not None else 0 for t in trees]
    Td = bucket_size(max(sizes + [1])) if pad else max(sizes + [1])
    if pad:
        trees = [t if t is not None else DraftTree([0], [-1], [0]) for t in trees]
        sizes = [Td] * B
    counts = [len(c) + s for c, s in zip(chains, sizes)]
    N, W = sum(counts), max(counts + [1])
    M = sum(sizes)
    ints = np.zeros((4, N), dtype=np.int64)  # tokens, rows, nodes, depths
    tree_ints = np.zeros((4, B, Td), dtype=np.int64)  # tokens, parents, depths, index into the logits
    tree_ints[1] = -1
    per_row = np.zeros((2, B), dtype=np.int64)  # shift, has_tree
    logit_index = np.zeros(M, dtype=np.int64)
    for b, (chain, tree) in enumerate(zip(chains, trees)):
        if tree is not None:
            n = len(tree.tokens)
            if n > Td:
                raise ValueError(f"row {b} has {n} nodes, more than the bucket of {Td}")
            tree_ints[0, b, :n], tree_ints[1, b, :n], tree_ints[2, b, :n] = tree.tokens, tree.parents, tree.depths
    anc = ancestor_mask(tree_ints[1], int(tree_ints[2].max()))  # (B, Td, Td)
    mask = np.zeros((N, W), dtype=np.bool_)
    off = m = 0
    for b, (chain, tree) in enumerate(zip(chains, trees)):
        P, T = len(chain), sizes[b]
        rows = slice(off, off + P + T)
        ints[1, rows] = b
        ints[2, rows] = np.arange(P + T)
        if P:
            ints[0, off:off + P] = chain
            ints[3, off:off + P] = np.arange(P)
            mask[off:off + P, :P] = np.tri(P, dtype=np.bool_)
        if T:
            t = slice(off + P, off + P + T)
            ints[0, t] = tree_ints[0, b, :T]
            ints[3, t] = P + tree_ints[2, b, :T]
            mask[t, :P] = True
            mask[t, P:P + T] = anc[b, :T, :T]
            logit_index[m:m + T] = np.arange(off + P, off + P + T)
            tree_ints[3, b, :T] = np.arange(m, m + T)
            per_row[1, b] = 1
        per_row[0, b] = P
        off += P + T
        m += T
    flat = torch.from_numpy(np.concatenate([ints.ravel(), tree_ints.ravel(), per_row.ravel(), logit_index])).to(device)
    masks = torch.from_numpy(np.concatenate([mask.ravel(), anc.ravel()])).to(device)
    ints_d, tree_d = flat[:4 * N].view(4, N), flat[4 * N:4 * N + 4 * B * Td].view(4, B, Td)
    rest = flat[4 * N + 4 * B * Td:]
    tree = DraftBatch(tree_d[0], tree_d[1], tree_d[2], masks[N * W:].view(B, Td, Td))
    return RaggedBatch(ints_d[0], ints_d[1], ints_d[2], ints_d[3], masks[:N * W].view(N, W), rest[2 * B:], tree,
                       tree_d[3], rest[:B], rest[B:2 * B], N, M, pad)
