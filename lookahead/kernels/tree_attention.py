"""tree_attention: one kernel for the verify step of lookahead decoding.

Each program owns one (row, kv head), one tile of M = (draft node, query head of that kv head) pairs, and one
split of the prefix. Packing the query heads of a grouped-query group with the nodes fills the M dimension of
the dot although T is small, and they share every K/V tile they load. Loops, as the STAGE split of Triton's
fused-attention tutorial:
  1. the split's full prefix tiles: no mask at all;
  2. (last split only) the prefix's partial tail tile, masked by cache_len, then the draft tile(s), slots
     cache_len + j for j < T: node i sees node j iff bit j of i's ancestor bit-vector is set (bit-vectors are
     built once per step from the tree mask, 64 nodes per int64 word).
Online softmax in fp32 (exp2, scale folded with log2 e), fp32 accumulators. With more than one split (long
prefixes, few programs) each split writes its unnormalised partial result and a second kernel merges them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


HEAD_DIMS = (16, 32, 64, 128, 256)  # head dims the kernel tiles (one power-of-two block)


def build_ancestor_bits(tree_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool -> [B, T, ceil(T / 64)] int64: bit j % 64 of word j // 64 set iff node i sees node j."""
    B, T, _ = tree_mask.shape
    words = triton.cdiv(T, 64)
    padded = torch.zeros(B, T, words * 64, dtype=torch.int64, device=tree_mask.device)
    padded[:, :, :T] = tree_mask
    shifts = torch.arange(64, device=tree_mask.device, dtype=torch.int64)
    # distinct bits never carry, so the sum is the bitwise or (bit 63 wraps to the sign bit, as intended)
    return (padded.view(B, T, words, 64) << shifts).sum(-1)


@triton.jit
def _softmax_step(qk, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One online-softmax step: scores qk (M, N) in log2 units, -inf where hidden, over a V tile (N, D)."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _tree_attention_kernel(
    q_ptr,       # [B, T, Hq, D] queries of the draft nodes
    k_ptr,       # [B, Hkv, S, D] key cache of this layer (draft rows at cache_len + j)
    v_ptr,       # [B, Hkv, S, D] value cache of this layer
    lens_ptr,    # [B] int64 committed length before the draft
    bits_ptr,    # [B, T, W] int64 ancestor bit-vectors (unused when CHAIN)
    out_ptr,     # [B, T, Hq, D] (SPLITS == 1), else [SPLITS, B, T, Hq, D] fp32 unnormalised partials
    ml_ptr,      # [SPLITS, B, T, Hq, 2] fp32 running max and sum of each partial (unused when SPLITS == 1)
    sm_scale_log2e,
    B, T, Hq, Hkv,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lens, stride_bb, stride_bt,
    GROUP: tl.constexpr,      # query heads per kv head
    SPLITS: tl.constexpr,     # prefix splits (flash-decoding) for long prefixes and few programs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CHAIN: tl.constexpr,      # no tree mask: node i sees nodes 0..i
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), "tf32" otherwise (ignored for 16-bit)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # m = node * GROUP + head in group
    node = offs_m // GROUP
    head = h * GROUP + offs_m % GROUP
    valid_m = node < T
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    cache_len = tl.load(lens_ptr + b * stride_lens)

    q = tl.load(q_ptr + b * stride_qb + node[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=valid_m[:, None], other=0.0)  # (M, D)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite, so fully masked rows never make NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # 1. this split's full prefix tiles: every node sees every slot < cache_len, so no mask
    full_tiles = cache_len // BLOCK_N
    per_split = tl.cdiv(full_tiles, SPLITS)
    lo = tl.minimum(split * per_split, full_tiles) * BLOCK_N
    hi = tl.minimum((split + 1) * per_split, full_tiles) * BLOCK_N
    for start in range(lo, hi, BLOCK_N):
        slots = start + offs_n
        k = tl.load(k_base + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd)  # (D, N)
        v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd)  # (N, D)
        qk = tl.dot(q, k, input_precision=PRECISION) * sm_scale_log2e  # (M, N)
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, PRECISION)

    if split == SPLITS - 1:
        # 2a. the prefix's partial tail tile (empty when BLOCK_N divides cache_len)
        slots = full_tiles * BLOCK_N + offs_n
        in_prefix = slots < cache_len
        k = tl.load(k_base + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=in_prefix[None, :], other=0.0)
        v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=in_prefix[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=PRECISION) * sm_scale_log2e
        qk = tl.where(in_prefix[None, :], qk, float("-inf"))
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, PRECISION)

        # 2b. the draft tree: node i sees node j iff j is i or an ancestor of i
        for first in range(0, T, BLOCK_N):
            j = first + offs_n
            valid_j = j < T
            slots = cache_len + j
            if CHAIN:
                visible = j[None, :] <= node[:, None]
            else:  # BLOCK_N divides 64, so the tile's nodes share one word of each row's bit-vector
                word = tl.load(bits_ptr + b * stride_bb + node * stride_bt + first // 64, mask=valid_m, other=0)
                visible = ((word[:, None] >> (j % 64).to(tl.int64)[None, :]) & 1) != 0
            visible = visible & valid_j[None, :]
            k = tl.load(k_base + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                        mask=valid_j[None, :], other=0.0)
            v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=valid_j[:, None], other=0.0)
            qk = tl.dot(q, k, input_precision=PRECISION) * sm_scale_log2e
            qk = tl.where(visible, qk, float("-inf"))
            m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, PRECISION)

    out_offs = b * stride_ob + node[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    if SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=valid_m[:, None])
    else:
        tl.store(out_ptr + split * B * stride_ob + out_offs, acc, mask=valid_m[:, None])
        ml = ml_ptr + (((split * B + b) * T + node) * Hq + head) * 2
        tl.store(ml, m_i, mask=valid_m)
        tl.store(ml + 1, l_i, mask=valid_m)


@triton.jit
def _merge_splits_kernel(
    part_ptr,    # [SPLITS, B * T * Hq, D] fp32 unnormalised partial outputs
    ml_ptr,      # [SPLITS, B * T * Hq, 2] fp32 running max (log2 units) and sum of each partial
    out_ptr,     # [B, T, Hq, D] contiguous
    rows,        # B * T * Hq
    SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    valid_s = offs_s < SPLITS
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.load(ml_ptr + (offs_s * rows + row) * 2, mask=valid_s, other=-1.0e30)
    l = tl.load(ml_ptr + (offs_s * rows + row) * 2 + 1, mask=valid_s, other=0.0)
    w = tl.math.exp2(m - tl.max(m, axis=0))  # (S,) rescales every partial to the common max
    part = tl.load(part_ptr + (offs_s[:, None] * rows + row) * HEAD_DIM + offs_d[None, :],
                   mask=valid_s[:, None], other=0.0)  # (S, D)
    out = tl.sum(part * w[:, None], axis=0) / tl.maximum(tl.sum(l * w, axis=0), 1.0e-30)
    tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))


_SM_COUNT: dict[int, int] = {}


def _num_splits(programs: int, S: int, device: torch.device) -> int:
    """Prefix splits so that about four programs run per SM, each split at least 256 slots of the cache. S (the
    cache's capacity) stands in for the committed length, which the host does not know without a sync."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(4 * _SM_COUNT[index] // programs, S // 256, 64))


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                   tree_mask: torch.Tensor | None, scale: float | None = None,
                   ancestor_bits: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Launcher; shapes, dtypes and devices were validated by lookahead.kernels.tree_attention. ancestor_bits
    ([B, T, W] int64 from build_ancestor_bits(tree_mask)) lets a model pack the mask once per step for all its
    layers; num_splits overrides the prefix split heuristic (tests)."""
    B, T, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if T > 128:
        raise ValueError(f"tree_attention verifies at most 128 nodes per row, got {T}; use a smaller draft bucket")
    if D not in HEAD_DIMS:
        raise ValueError(f"the Triton tree_attention takes head dims 16, 32, 64, 128 or 256, got {D}; "
                         "set LOOKAHEAD_KERNELS=torch for other sizes")
    group = Hq // Hkv
    chain = tree_mask is None
    if chain:
        bits = q.new_zeros(1, 1, 1, dtype=torch.int64)
    elif ancestor_bits is None:
        bits = build_ancestor_bits(tree_mask)
    else:
        bits = ancestor_bits
    block_m = min(128, max(16, triton.next_power_of_2(T * group)))
    block_n = 64 if block_m * D <= 64 * 128 else 32
    m_tiles = triton.cdiv(T * group, block_m)
    splits = num_splits or _num_splits(m_tiles * B * Hkv, S, q.device)
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    if splits == 1:
        part, ml = out, out
    else:
        part = torch.empty(splits, B, T, Hq, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(splits, B, T, Hq, 2, dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    fp32 = q.dtype == torch.float32
    _tree_attention_kernel[(m_tiles, B * Hkv, splits)](
        q, k_cache, v_cache, cache_lens, bits, part, ml, scale * 1.4426950408889634, B, T, Hq, Hkv,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *part.stride()[-4:],
        cache_lens.stride(0), bits.stride(0), bits.stride(1),
        GROUP=group, SPLITS=splits, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, CHAIN=chain,
        PRECISION="ieee" if fp32 else "tf32",
        num_warps=8 if block_m * D >= 128 * 128 else 4, num_stages=2 if fp32 and block_m * D >= 64 * 128 else 3)
    if splits > 1:
        _merge_splits_kernel[(B * T * Hq,)](part, ml, out, B * T * Hq, SPLITS=splits,
                                            BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=D)
    return out
