"""tree_attention: one kernel for the verify step of lookahead decoding.

Each program owns one (row, kv head) and a tile of M = (draft node, query head of that kv head) pairs, so the
query heads of a grouped-query group share every K/V tile they load and fill the M dimension of the dot even
though T is small. Two loops, as the STAGE split of Triton's fused-attention tutorial:
  1. the committed prefix, slots [0, cache_len): mask-free but for the bound of the last tile;
  2. the draft, slots cache_len + j for j < T: node i sees node j iff bit j of i's ancestor bit-vector is set
     (bit-vectors are built once per step from the tree mask, 64 nodes per int64 word).
Online softmax in fp32 (exp2, scale folded with log2 e), fp32 accumulators.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def ancestor_bits(tree_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool -> [B, T, ceil(T / 64)] int64: bit j % 64 of word j // 64 set iff node i sees node j."""
    B, T, _ = tree_mask.shape
    words = triton.cdiv(T, 64)
    padded = torch.zeros(B, T, words * 64, dtype=torch.int64, device=tree_mask.device)
    padded[:, :, :T] = tree_mask
    shifts = torch.arange(64, device=tree_mask.device, dtype=torch.int64)
    # distinct bits never carry, so the sum is the bitwise or (bit 63 wraps to the sign bit, as intended)
    return (padded.view(B, T, words, 64) << shifts).sum(-1)


@triton.jit
def _tree_attention_kernel(
    q_ptr,       # [B, T, Hq, D] queries of the draft nodes
    k_ptr,       # [B, Hkv, S, D] key cache of this layer (draft rows at cache_len + j)
    v_ptr,       # [B, Hkv, S, D] value cache of this layer
    lens_ptr,    # [B] int64 committed length before the draft
    bits_ptr,    # [B, T, W] int64 ancestor bit-vectors (unused when CHAIN)
    out_ptr,     # [B, T, Hq, D]
    sm_scale_log2e,
    T, Hkv, D,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_bb, stride_bt,
    GROUP: tl.constexpr,      # query heads per kv head
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHAIN: tl.constexpr,      # no tree mask: node i sees nodes 0..i
    IEEE: tl.constexpr,       # fp32 inputs: exact fp32 dots (no tf32)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # m = node * GROUP + head in group
    node = offs_m // GROUP
    head = h * GROUP + offs_m % GROUP
    valid_m = node < T
    offs_d = tl.arange(0, BLOCK_D)
    valid_d = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    cache_len = tl.load(lens_ptr + b)

    q = tl.load(q_ptr + b * stride_qb + node[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=valid_m[:, None] & valid_d[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite, so fully masked rows never make NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # 1. the committed prefix: every node sees every slot < cache_len
    for start in range(0, cache_len, BLOCK_N):
        slots = start + offs_n
        in_prefix = slots < cache_len
        k = tl.load(k_base + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=in_prefix[None, :] & valid_d[:, None], other=0.0)  # (D, N)
        if IEEE:
            qk = tl.dot(q, k, input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        qk = tl.where(in_prefix[None, :], qk * sm_scale_log2e, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=in_prefix[:, None] & valid_d[None, :], other=0.0)  # (N, D)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # 2. the draft tree: node i sees node j iff j is i or an ancestor of i
    for start in range(0, T, BLOCK_N):
        j = start + offs_n
        valid_j = j < T
        slots = cache_len + j
        if CHAIN:
            visible = j[None, :] <= node[:, None]
        else:
            word = tl.load(bits_ptr + b * stride_bb + node[:, None] * stride_bt + (j // 64)[None, :],
                           mask=valid_m[:, None] & valid_j[None, :], other=0)
            visible = ((word >> (j % 64).to(tl.int64)[None, :]) & 1) != 0
        visible = visible & valid_j[None, :] & valid_m[:, None]
        k = tl.load(k_base + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=valid_j[None, :] & valid_d[:, None], other=0.0)
        if IEEE:
            qk = tl.dot(q, k, input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        qk = tl.where(visible, qk * sm_scale_log2e, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=valid_j[:, None] & valid_d[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + b * stride_ob + node[:, None] * stride_ot + head[:, None] * stride_oh
             + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=valid_m[:, None] & valid_d[None, :])


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                   tree_mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """Launcher; shapes, dtypes and devices were validated by lookahead.kernels.tree_attention."""
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    if T > 128:
        raise ValueError(f"tree_attention verifies at most 128 nodes per row, got {T}")
    if D > 256:
        raise ValueError(f"tree_attention supports head dims up to 256, got {D}")
    group = Hq // Hkv
    out = torch.empty_like(q)
    chain = tree_mask is None
    bits = q.new_zeros(1, dtype=torch.int64) if chain else ancestor_bits(tree_mask)
    block_m = min(128, max(16, triton.next_power_of_2(T * group)))
    block_d = max(16, triton.next_power_of_2(D))
    block_n = 64 if block_d <= 64 else 32
    grid = (triton.cdiv(T * group, block_m), B * Hkv)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, cache_lens, bits, out, scale * 1.4426950408889634, T, Hkv, D,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        bits.stride(0) if not chain else 0, bits.stride(1) if not chain else 0,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CHAIN=chain,
        IEEE=q.dtype == torch.float32, num_warps=8 if block_m * block_d >= 128 * 128 else 4)
    return out
