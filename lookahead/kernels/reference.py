"""Torch references of the kernels. They define the semantics (docs/API.md) and are the path of every device the
Triton kernels do not serve (CPU; CUDA without triton)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
         is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention with grouped-query attention: q [B, Hq, T, D], k/v [B, Hkv, S, D],
    Hq % Hkv == 0 -> [B, Hq, T, D]. Uses enable_gqa where torch has it, else repeats the kv heads."""
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq != Hkv:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=True)
        k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, S, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                   tree_mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """q [B, T, Hq, D]; k/v_cache [B, Hkv, S, D] with the T node rows at slots cache_lens[b] + i; tree_mask
    [B, T, T] (None = causal chain) -> [B, T, Hq, D]."""
    B, T = q.shape[:2]
    # slots any row can see; on CUDA the whole cache, since reading cache_lens would sync (and break graph capture)
    span = k_cache.shape[2] if q.is_cuda else int(cache_lens.max()) + T
    k, v = k_cache[:, :, :span], v_cache[:, :, :span]  # (B, Hkv, S', D)
    if tree_mask is None:
        tree_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril_().expand(B, T, T)
    slot = torch.arange(span, device=q.device)  # (S',)
    node = slot[None, :] - cache_lens[:, None]  # (B, S') node index of each slot, < 0 in the prefix
    in_tree = (node >= 0) & (node < T)
    # visible[b, i, s] = prefix slot, or a tree slot whose node is an ancestor of (or is) node i
    tree_part = tree_mask.gather(2, node.clamp(0, T - 1)[:, None, :].expand(B, T, span))  # (B, T, S')
    visible = (node < 0)[:, None, :] | (in_tree[:, None, :] & tree_part)  # (B, T, S')
    out = sdpa(q.transpose(1, 2), k, v, attn_mask=visible[:, None], scale=scale)  # (B, Hq, T, D)
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


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 lanes holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seed: int | torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, T, vocab] fp32 for positions [B, T] of rows [B]: a hash of (seed, row, position,
    vocab id) in 32-bit arithmetic, made uniform in (0, 1), then -log(-log(u)) in fp64. seed: one int, or an int64
    tensor [B] of per-row seeds (a seed >= 2**63 stored as its two's-complement int64)."""
    device = positions.device
    v = torch.arange(vocab, device=device, dtype=torch.int64)
    lo, hi = (seed & _M32, seed >> 32 & _M32) if isinstance(seed, int) else (  # (B, 1) and (B, 1, 1) per row
        (seed & _M32)[:, None], (seed >> 32 & _M32)[:, None, None])
    key = _mix32((rows[:, None] * 0x9E3779B1 + positions + lo * 0x632BE5AB) & _M32)  # (B, T)
    x = _mix32((key[..., None] ^ ((v * 0x85EBCA77) & _M32)) & _M32)  # (B, T, V)
    x = _mix32((x + 0x27D4EB2F + hi) & _M32)
    u = (x.to(torch.float64) + 0.5) / 4294967296.0  # in (0, 1)
    return (-torch.log(-torch.log(u))).to(torch.float32)
