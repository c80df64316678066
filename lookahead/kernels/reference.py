"""Torch references of the three kernels. They define the semantics (API.md) and are the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                   tree_mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """q [B, T, Hq, D]; k/v_cache [B, Hkv, S, D] with the T node rows at slots cache_lens[b] + i; tree_mask
    [B, T, T] (None = causal chain) -> [B, T, Hq, D]."""
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    span = int(cache_lens.max()) + T  # slots any row can see
    k, v = k_cache[:, :, :span], v_cache[:, :, :span]  # (B, Hkv, S', D)
    if tree_mask is None:
        tree_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril_().expand(B, T, T)
    slot = torch.arange(span, device=q.device)  # (S',)
    node = slot[None, :] - cache_lens[:, None]  # (B, S') node index of each slot, < 0 in the prefix
    in_tree = (node >= 0) & (node < T)
    # visible[b, i, s] = prefix slot, or a tree slot whose node is an ancestor of (or is) node i
    tree_part = tree_mask.gather(2, node.clamp(0, T - 1)[:, None, :].expand(B, T, span))  # (B, T, S')
    visible = (node < 0)[:, None, :] | (in_tree[:, None, :] & tree_part)  # (B, T, S')
    qh = q.transpose(1, 2)  # (B, Hq, T, D)
    if Hq != Hkv:
        if _SDPA_HAS_GQA:
            out = F.scaled_dot_product_attention(qh, k, v, attn_mask=visible[:, None], scale=scale, enable_gqa=True)
            return out.transpose(1, 2)
        k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=visible[:, None], scale=scale)
    return out.transpose(1, 2)  # (B, T, Hq, D)


def accept_longest_path(draft_tokens: torch.Tensor, parents: torch.Tensor,
                        target_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Longest correct root-to-node path per row: (path [B, T] padded with -1, num_accepted [B]).

    Plain Python over host lists: T <= 128 and this is the CPU path, where a per-node loop of torch ops
    would cost more than the whole walk."""
    B, T = draft_tokens.shape
    paths, nums = [], []
    for tokens, par, targets in zip(draft_tokens.tolist(), parents.tolist(), target_tokens.tolist()):
        depth = [0] + [-1] * (T - 1)  # -1: not correct
        best = 0
        for i in range(1, T):  # parents come before children: one pass in index order settles every node
            p = par[i]
            if p >= 0 and depth[p] >= 0 and tokens[i] == targets[p]:
                depth[i] = depth[p] + 1
                if depth[i] > depth[best]:  # strictly deeper: ties keep the smallest index
                    best = i
        path = [-1] * T
        node = best
        while node >= 0:
            path[depth[node]] = node
            node = par[node]
        paths.append(path)
        nums.append(depth[best] + 1)
    device = draft_tokens.device
    return (torch.tensor(paths, dtype=torch.long, device=device).view(B, T),
            torch.tensor(nums, dtype=torch.long, device=device))


def compact_kv(cache: torch.Tensor, cache_lens: torch.Tensor, path: torch.Tensor,
               num_accepted: torch.Tensor) -> None:
    """In place: cache[:, :, b, :, cache_lens[b] + j] = old cache[:, :, b, :, cache_lens[b] + path[b, j]]."""
    B, T = path.shape
    j = torch.arange(T, device=path.device)
    move = (j[None] < num_accepted[:, None]) & (path != j[None])  # (B, T) rows not already in place
    if not bool(move.any()):
        return
    b_idx, j_idx = move.nonzero(as_tuple=True)
    src = cache_lens[b_idx] + path[b_idx, j_idx]
    dst = cache_lens[b_idx] + j_idx
    rows = cache[:, :, b_idx, :, src].clone()  # gather every source before any store: sources and dests overlap
    cache[:, :, b_idx, :, dst] = rows
