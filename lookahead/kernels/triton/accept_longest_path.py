"""accept_longest_path: one program per row finds the deepest draft node whose whole path matches the model.

Node i > 0 is correct when its token equals the target of its parent and every ancestor is correct; the
deepest correct node wins, ties to the smallest index. The walk up the ancestors runs T times over all nodes
at once (gathers from the row's own arrays), so nothing leaves the device until the host reads the result.
"""

from __future__ import annotations

import torch

import lookahead.kernels.reference as reference
from lookahead.kernels.dispatch import backend, check_int64, check_same_device, check_values, jit, tl, triton
from lookahead.config import MAX_TREE_NODES


@jit
def _accept_longest_path_kernel(
    tokens_ptr,   # [B, T] int64 draft tokens, node 0 = root
    parents_ptr,  # [B, T] int64, -1 for the root and for padding nodes; parents[i] < i otherwise
    targets_ptr,  # [B, T] int64 the model's token after each node
    path_ptr,     # [B, T] int64 out: root .. deepest correct node, then -1
    num_ptr,      # [B] int64 out: nodes on the path (>= 1)
    T,
    stride_row,   # elements between rows of the [B, T] inputs and of path
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK_T)
    valid = offs < T
    # Walk every node up to the root at once. Invariant: parents[i] < i, so T steps reach the root (index 0).
    cur = tl.where(valid, offs, 0)
    ok = valid
    depth = tl.zeros([BLOCK_T], dtype=tl.int32)
    for _ in range(0, T):
        climbing = cur > 0
        parent = tl.load(parents_ptr + base + cur, mask=climbing, other=0)
        token = tl.load(tokens_ptr + base + cur, mask=climbing, other=0)
        has_parent = climbing & (parent >= 0)
        target = tl.load(targets_ptr + base + tl.where(has_parent, parent, 0), mask=has_parent, other=0)
        ok = ok & (~climbing | (has_parent & (token == target)))
        depth += climbing.to(tl.int32)
        cur = tl.where(has_parent, parent, 0).to(cur.dtype)
    # deepest correct node, ties to the smallest index: one max over depth * BLOCK_T + (BLOCK_T - 1 - i)
    key = tl.where(ok, depth * BLOCK_T + (BLOCK_T - 1 - offs), -1)
    best_key = tl.max(key, axis=0)
    best = BLOCK_T - 1 - best_key % BLOCK_T
    n = best_key // BLOCK_T + 1
    # the path: slot d holds best's ancestor at depth d; walk up from best filling slots n-1 .. 0
    path = tl.full([BLOCK_T], -1, dtype=tl.int64)
    node = best.to(tl.int64)
    for k in range(0, T):
        slot = n - 1 - k
        path = tl.where(offs == slot, node, path)
        node = tl.load(parents_ptr + base + node, mask=slot > 0, other=0)
    tl.store(path_ptr + base + offs, path, mask=valid)
    tl.store(num_ptr + row, n.to(tl.int64))


def launch(draft_tokens: torch.Tensor, parents: torch.Tensor,
           target_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton launcher, for inputs accept_longest_path validated."""
    B, T = draft_tokens.shape
    if T > MAX_TREE_NODES:
        raise ValueError(f"accept_longest_path takes at most {MAX_TREE_NODES} nodes per row, got {T}")
    tokens, parents, targets = (t.contiguous() for t in (draft_tokens, parents, target_tokens))
    path = torch.empty_like(tokens)
    num = torch.empty(B, dtype=torch.int64, device=tokens.device)
    # one program holds a whole row; T padded to a power of two for tl.arange, at least 16 (a hand choice; 6.2 us
    # at T = 64 on an H100, bench/gpu/bench_kernels_h100.md)
    _accept_longest_path_kernel[(B,)](tokens, parents, targets, path, num, T, T,
                                      BLOCK_T=max(16, triton.next_power_of_2(T)))
    return path, num


def accept_longest_path(draft_tokens, parents, target_tokens):
    """Deepest draft node whose whole path matches the model's own tokens (docs/API.md)."""
    for name, t in (("draft_tokens", draft_tokens), ("parents", parents), ("target_tokens", target_tokens)):
        check_int64(name, t, 2)
    if parents.shape != draft_tokens.shape or target_tokens.shape != draft_tokens.shape:
        raise ValueError(f"draft_tokens, parents and target_tokens must share [B, T], got "
                         f"{tuple(draft_tokens.shape)}, {tuple(parents.shape)}, {tuple(target_tokens.shape)}")
    check_same_device(draft_tokens=draft_tokens, parents=parents, target_tokens=target_tokens)
    if check_values(parents):
        T = parents.shape[1]
        idx = torch.arange(T, device=parents.device)
        bad = (parents[:, 0] != -1).any() | ((parents[:, 1:] >= idx[1:]) | (parents[:, 1:] < -1)).any()
        if bool(bad):
            raise ValueError("parents must satisfy parents[b, 0] = -1 and -1 <= parents[b, i] < i (topological "
                             "order; -1 marks padding)")
    if backend(draft_tokens) == "triton":
        return launch(draft_tokens, parents, target_tokens)
    return reference.accept_longest_path(draft_tokens, parents, target_tokens)
