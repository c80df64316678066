"""tree_attention: one kernel for the verify step of lookahead decoding.

Each program owns one (row, kv head), one tile of M = (draft node, query head of that kv head) pairs, and one
split of the prefix. Packing the query heads of a grouped-query group with the nodes fills the M dimension of
the dot although T is small, and they share every K/V tile they load. Loops, as the STAGE split of Triton's
fused-attention tutorial:
  1. the split's full prefix tiles: no score mask at all;
  2. (last split only) the prefix's partial tail tile, masked by cache_len, then the draft tile(s), slots
     cache_len + j for j < T: node i sees node j iff bit j of i's ancestor bit-vector is set (bit-vectors are
     built once per step from the tree mask, 64 nodes per int64 word).
Online softmax in fp32 (exp2, scale folded with log2 e), fp32 accumulators. With more than one split (long
prefixes, few programs) each split writes its unnormalised partial result and a second kernel merges them.
Any head dim up to 256 runs: the D axis is a power-of-two block HEAD_DIM >= D, loads and stores masked to d < D.

EXACT mode (constexpr, LookaheadConfig.exact): one program per node, whose keys are walked in the order the
one-token step that later decodes the node sees them after compaction (the prefix, then its own root-to-node
path), in tiles at the same logical positions, split alike, every tile through the same instructions; so the
node's output has that step's bits. It gives up the shared prefix loads of the packed tiles (each node re-reads
the prefix, from L2 when the nodes of a row run together): the price of exactness, not yet measured on a GPU.
"""

from __future__ import annotations

import math

import torch

import lookahead.kernels.reference as reference
from lookahead.kernels.dispatch import backend, check_int64, check_same_device, check_values, jit, tl, triton
from lookahead.config import MAX_TREE_NODES, forced_kernels

MAX_HEAD_DIM = 256  # the largest head dim of common models (Gemma); larger ones run the reference unless forced


@jit
def _softmax_step(qk, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One online-softmax step: scores qk (M, N) in log2 units, -inf where hidden, over a V tile (N, D)."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@jit
def _exact_tile(q, k, v, logical, length, m_i, l_i, acc, sm_scale_log2e, PRECISION: tl.constexpr):
    """One EXACT tile over logical key positions `logical` (N,): the same instructions for every tile, whichever
    loop loaded it, so a tile gives the same bits in a verify step and in the one-token step."""
    qk = tl.dot(q, k, input_precision=PRECISION) * sm_scale_log2e  # (M, N)
    qk = tl.where((logical < length)[None, :], qk, float("-inf"))
    return _softmax_step(qk, v, m_i, l_i, acc, PRECISION)


@jit
def _exact_loops(q, k_base, v_base, bits_row, cache_len, node, T, split, m_i, l_i, acc, sm_scale_log2e,
                 stride_ks, stride_kd, stride_vs, stride_vd, offs_n, offs_d, d_ok,
                 SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, CHAIN: tl.constexpr,
                 PRECISION: tl.constexpr):
    """EXACT mode: the keys of one node in the order the one-token step decoding it sees them after compaction.

    Logical position p < cache_len is prefix slot p; p = cache_len + r is the node's ancestor at depth r (the node
    itself at r = depth), in slot cache_len + (its node index). The one-token step at position cache_len + depth
    has exactly these keys at slots p. Both walk logical tiles [t BLOCK_N, (t + 1) BLOCK_N) up to the length
    cache_len + depth + 1, split among SPLITS by that length alone, each tile through _exact_tile: same tiles,
    same order, same split, same bits. Relies on parents coming before children (DFS pre-order, docs/API.md), so an
    ancestor's depth is its rank by node index among the ancestors."""
    if CHAIN:
        depth = node
    else:
        jj = tl.arange(0, BLOCK_T)
        word = tl.load(bits_row + jj // 64, mask=jj < T, other=0)  # (BLOCK_T,) word of node j's bit
        is_anc = (((word >> (jj % 64).to(tl.int64)) & 1) != 0) & (jj < T)
        # cum[j] = ancestors (the node included) with index <= j
        cum = tl.sum(tl.where((jj[None, :] <= jj[:, None]) & is_anc[None, :], 1, 0), axis=1)  # (BLOCK_T,)
        depth = tl.sum(is_anc.to(tl.int32), axis=0) - 1
    length = cache_len + depth + 1
    tiles = tl.cdiv(length, BLOCK_N)
    per_split = tl.cdiv(tiles, SPLITS)
    t_lo = tl.minimum(split * per_split, tiles)
    t_hi = tl.minimum(t_lo + per_split, tiles)
    pure = tl.minimum(cache_len // BLOCK_N, t_hi)  # tiles wholly inside the prefix: slot = logical position
    for t in range(t_lo, pure):
        p = t * BLOCK_N + offs_n
        k = tl.load(k_base + p[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_base + p[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=d_ok[None, :], other=0.0)
        m_i, l_i, acc = _exact_tile(q, k, v, p, length, m_i, l_i, acc, sm_scale_log2e, PRECISION)
    for t in range(tl.maximum(t_lo, pure), t_hi):
        p = t * BLOCK_N + offs_n
        rank = p - cache_len  # depth of the ancestor at p, where p >= cache_len
        if CHAIN:
            ancestor = rank
        else:  # the ancestor of that depth: the number of j with cum[j] <= rank
            ancestor = tl.sum(tl.where(cum[None, :] <= rank[:, None], 1, 0), axis=1)  # (N,)
        slots = tl.where(p < cache_len, p, cache_len + ancestor)
        inside = p < length
        k = tl.load(k_base + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=inside[None, :] & d_ok[:, None], other=0.0)  # (D, N)
        v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=inside[:, None] & d_ok[None, :], other=0.0)  # (N, D)
        m_i, l_i, acc = _exact_tile(q, k, v, p, length, m_i, l_i, acc, sm_scale_log2e, PRECISION)
    return m_i, l_i, acc


@jit
def _tree_attention_kernel(
    q_ptr,       # [B, T, Hq, D] queries of the draft nodes
    k_ptr,       # [B, Hkv, S, D] key cache of this layer (draft rows at cache_len + j)
    v_ptr,       # [B, Hkv, S, D] value cache of this layer
    lens_ptr,    # [B] int64 committed length before the draft
    bits_ptr,    # [B, T, W] int64 ancestor bit-vectors, words contiguous (unused when CHAIN)
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
    BLOCK_N: tl.constexpr,    # divides 64: the draft nodes of one tile share one word of each bit-vector
    D: tl.constexpr,          # the head dim
    HEAD_DIM: tl.constexpr,   # D padded to a power of two (>= 16 for tl.dot)
    CHAIN: tl.constexpr,      # no tree mask: node i sees nodes 0..i
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), "tf32" otherwise (ignored for 16-bit)
    EXACT: tl.constexpr = False,  # one node a program, its keys in the one-token step's order (_exact_loops)
    BLOCK_T: tl.constexpr = 16,   # EXACT: next_power_of_2(T), the lanes of one ancestor bit-vector
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    if EXACT:  # program pid_m = node pid_m, its GROUP query heads in rows 0..GROUP-1 of the tile
        offs_g = tl.arange(0, BLOCK_M)
        node = pid_m + offs_g * 0
        head = h * GROUP + offs_g
        valid_m = offs_g < GROUP
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # m = node * GROUP + head in group
        node = offs_m // GROUP
        head = h * GROUP + offs_m % GROUP
        valid_m = node < T
    offs_d = tl.arange(0, HEAD_DIM)
    # lanes d >= D (a padded head dim) load 0 from q, k and v, so they add 0 to every score, and are never stored
    d_ok = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    cache_len = tl.load(lens_ptr + b * stride_lens)

    q = tl.load(q_ptr + b * stride_qb + node[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=valid_m[:, None] & d_ok[None, :], other=0.0)  # (M, D)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite, so fully masked rows never make NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if EXACT:
        m_i, l_i, acc = _exact_loops(q, k_base, v_base, bits_ptr + b * stride_bb + pid_m * stride_bt, cache_len,
                                     pid_m, T, split, m_i, l_i, acc, sm_scale_log2e, stride_ks, stride_kd,
                                     stride_vs, stride_vd, offs_n, offs_d, d_ok,
                                     SPLITS, BLOCK_N, BLOCK_T, CHAIN, PRECISION)
    else:
        # 1. this split's full prefix tiles: every node sees every slot < cache_len, so no score mask
        full_tiles = cache_len // BLOCK_N
        per_split = tl.cdiv(full_tiles, SPLITS)
        lo = tl.minimum(split * per_split, full_tiles) * BLOCK_N
        hi = tl.minimum((split + 1) * per_split, full_tiles) * BLOCK_N
        for start in range(lo, hi, BLOCK_N):
            slots = start + offs_n
            k = tl.load(k_base + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                        mask=d_ok[:, None], other=0.0)  # (D, N)
            v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=d_ok[None, :], other=0.0)  # (N, D)
            qk = tl.dot(q, k, input_precision=PRECISION) * sm_scale_log2e  # (M, N)
            m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, PRECISION)

        if split == SPLITS - 1:
            # 2a. the prefix's partial tail tile (empty when BLOCK_N divides cache_len)
            slots = full_tiles * BLOCK_N + offs_n
            in_prefix = slots < cache_len
            k = tl.load(k_base + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                        mask=in_prefix[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=in_prefix[:, None] & d_ok[None, :], other=0.0)
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
                    word = tl.load(bits_ptr + b * stride_bb + node * stride_bt + first // 64, mask=valid_m,
                                   other=0)
                    visible = ((word[:, None] >> (j % 64).to(tl.int64)[None, :]) & 1) != 0
                visible = visible & valid_j[None, :]
                k = tl.load(k_base + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                            mask=valid_j[None, :] & d_ok[:, None], other=0.0)
                v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                            mask=valid_j[:, None] & d_ok[None, :], other=0.0)
                qk = tl.dot(q, k, input_precision=PRECISION) * sm_scale_log2e
                qk = tl.where(visible, qk, float("-inf"))
                m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, PRECISION)

    out_offs = b * stride_ob + node[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    out_mask = valid_m[:, None] & d_ok[None, :]
    if SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + split * B * stride_ob + out_offs, acc, mask=out_mask)
        ml = ml_ptr + (((split * B + b) * T + node) * Hq + head) * 2
        tl.store(ml, m_i, mask=valid_m)
        tl.store(ml + 1, l_i, mask=valid_m)


@jit
def _merge_splits_kernel(
    part_ptr,    # [SPLITS, B * T * Hq, D] fp32 unnormalised partial outputs, contiguous
    ml_ptr,      # [SPLITS, B * T * Hq, 2] fp32 running max (log2 units) and sum of each partial
    out_ptr,     # [B, T, Hq, D] contiguous
    rows,        # B * T * Hq
    SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    D: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # D padded to a power of two
):
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    valid_s = offs_s < SPLITS
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    m = tl.load(ml_ptr + (offs_s * rows + row) * 2, mask=valid_s, other=-1.0e30)
    l = tl.load(ml_ptr + (offs_s * rows + row) * 2 + 1, mask=valid_s, other=0.0)
    w = tl.math.exp2(m - tl.max(m, axis=0))  # (S,) rescales every partial to the common max
    part = tl.load(part_ptr + (offs_s[:, None] * rows + row) * D + offs_d[None, :],
                   mask=valid_s[:, None] & d_ok[None, :], other=0.0)  # (S, D)
    out = tl.sum(part * w[:, None], axis=0) / tl.maximum(tl.sum(l * w, axis=0), 1.0e-30)
    tl.store(out_ptr + row * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


_SM_COUNT: dict[int, int] = {}


def _num_splits(programs: int, S: int, device: torch.device) -> int:
    """Prefix splits for about four programs per SM, each split at least 256 slots of the cache, at most 64. Set by
    hand, not swept (docs/benchmarks.md#tree_attention was measured with these values). S (the cache's capacity) stands
    in for the committed length, which the host does not know without a sync."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(4 * _SM_COUNT[index] // programs, S // 256, 64))


def build_ancestor_bits(tree_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool -> [B, T, ceil(T / 64)] int64: bit j % 64 of word j // 64 set iff node i sees node j."""
    B, T, _ = tree_mask.shape
    words = -(-T // 64)
    padded = torch.zeros(B, T, words * 64, dtype=torch.int64, device=tree_mask.device)
    padded[:, :, :T] = tree_mask
    shifts = torch.arange(64, device=tree_mask.device, dtype=torch.int64)
    # distinct bits never carry, so the sum is the bitwise or (bit 63 wraps to the sign bit, as intended)
    return (padded.view(B, T, words, 64) << shifts).sum(-1)


def _exact_splits(Hkv: int, S: int, device: torch.device) -> int:
    """EXACT mode's prefix splits: a function of the cache (Hkv kv heads, S slots) and the device only, never of
    T or the batch, so that a verify step and the one-token step split a node's keys alike. About four programs
    per SM for one row's one-token step, each split at least 256 slots, at most 64; not swept."""
    if device.type != "cuda":
        return 1
    return _num_splits(Hkv, S, device)


def launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
           tree_mask: torch.Tensor | None, scale: float | None = None, ancestor_bits: torch.Tensor | None = None,
           num_splits: int | None = None, exact: bool = False) -> torch.Tensor:
    """The Triton launcher, for inputs tree_attention validated; num_splits overrides the split heuristic (tests).
    exact: one program per node with its keys in the one-token step's order (see _exact_loops)."""
    B, T, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if T > MAX_TREE_NODES:
        raise ValueError(f"tree_attention verifies at most {MAX_TREE_NODES} nodes per row, got {T}; use a smaller "
                         "draft bucket")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"the Triton tree_attention takes head dims up to {MAX_HEAD_DIM}, got {D}; unset "
                         "LOOKAHEAD_KERNELS to run the torch reference for it")
    group = Hq // Hkv
    chain = tree_mask is None
    if chain:
        bits = q.new_zeros(1, 1, 1, dtype=torch.int64)
    elif ancestor_bits is None:
        bits = build_ancestor_bits(tree_mask)
    else:
        bits = ancestor_bits
    head_dim = max(16, triton.next_power_of_2(D))  # tl.dot needs every dim >= 16
    # all (node, query head) pairs of one kv head in one tile, from tl.dot's minimum 16 rows up to 128 (the
    # accumulator's register count, see num_warps; not swept)
    # EXACT: one node's query heads, the same tile for every T (a one-token step included)
    block_m = max(16, triton.next_power_of_2(group)) if exact else min(128, max(16, triton.next_power_of_2(T * group)))
    # K/V tile: 64 slots, halved for the largest Q tiles so that scores, Q and the accumulator stay in registers;
    # set by hand, not swept (README: the sweep is a next step). Must divide 64 (one bit-vector word per tile).
    block_n = 64 if block_m * head_dim <= 64 * 128 else 32
    m_tiles = T if exact else triton.cdiv(T * group, block_m)
    splits = num_splits or (_exact_splits(Hkv, S, q.device) if exact else _num_splits(m_tiles * B * Hkv, S, q.device))
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
        GROUP=group, SPLITS=splits, BLOCK_M=block_m, BLOCK_N=block_n, D=D, HEAD_DIM=head_dim, CHAIN=chain,
        PRECISION="ieee" if fp32 else "tf32", EXACT=exact, BLOCK_T=max(16, triton.next_power_of_2(T)),
        # 8 warps for a 128 x 128 tile: its fp32 accumulator alone is 64 registers a thread over 256 threads
        # (128 over 4 warps); 4 below that. Chosen by this count, not swept.
        num_warps=8 if block_m * head_dim >= 128 * 128 else 4,
        # fp32 tiles are twice the bytes: at 64 x 128 (BLOCK_N 64) K and V take 64 KiB a stage, so three stages
        # and Q would nearly fill an H100 block's 227 KiB of shared memory; two from that size up. Not swept.
        num_stages=2 if fp32 and block_m * head_dim >= 64 * 128 else 3,
        # EXACT: no fused multiply-add contraction, so the compiler's choices around each tile (which loop, which
        # constexprs) cannot change its rounding
        enable_fp_fusion=not exact)
    if splits > 1:
        _merge_splits_kernel[(B * T * Hq,)](part, ml, out, B * T * Hq, SPLITS=splits,
                                            BLOCK_S=triton.next_power_of_2(splits), D=D, HEAD_DIM=head_dim)
    return out


def ancestor_bits(tree_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The tree mask packed for the Triton tree_attention ([B, T, ceil(T / 64)] int64 bit-vectors), or None
    where the torch reference will run. A model packs it once per step and passes it to every layer."""
    if tree_mask is None or backend(tree_mask) != "triton":
        return None
    return build_ancestor_bits(tree_mask)


def tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale=None, *, ancestor_bits=None, exact=False):
    """Attention of T draft nodes over the committed prefix and their tree ancestors (docs/API.md). ancestor_bits:
    optional, `ancestor_bits(tree_mask)` computed once per step (the Triton kernel packs the mask otherwise).
    exact: each node's output has the bits of the one-token step that decodes it after compaction (the Triton
    kernel's EXACT mode; the torch reference ignores it). Needs parents before children (DFS pre-order)."""
    if not isinstance(exact, bool):
        raise ValueError(f"exact must be a bool, got {exact!r}")
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"expected q [B, T, Hq, D] and k/v_cache [B, Hkv, S, D] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, T, Hq, D = q.shape
    Bk, Hkv, S, Dk = k_cache.shape
    if Bk != B or Dk != D or Hq % Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}: batch and head dim "
                         "must match and Hq must be a multiple of Hkv")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype or not q.is_floating_point():
        raise ValueError(f"q, k_cache and v_cache must share one float dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    check_int64("cache_lens", cache_lens, 1)
    if cache_lens.shape[0] != B:
        raise ValueError(f"cache_lens has {cache_lens.shape[0]} rows, q has {B}")
    if tree_mask is not None and (tree_mask.dtype != torch.bool or tuple(tree_mask.shape) != (B, T, T)):
        raise ValueError(f"tree_mask must be bool [B, T, T] = {(B, T, T)}, got {tree_mask.dtype} "
                         f"{tuple(tree_mask.shape)}")
    if ancestor_bits is not None:
        words = -(-T // 64)
        if (not isinstance(ancestor_bits, torch.Tensor) or ancestor_bits.dtype != torch.int64
                or tuple(ancestor_bits.shape) != (B, T, words) or (words > 1 and ancestor_bits.stride(2) != 1)):
            raise ValueError(f"ancestor_bits must be int64 [B, T, ceil(T / 64)] = {(B, T, words)} with contiguous "
                             f"words, from lookahead.kernels.ancestor_bits(tree_mask); got "
                             f"{getattr(ancestor_bits, 'dtype', type(ancestor_bits).__name__)} "
                             f"{tuple(getattr(ancestor_bits, 'shape', ()))} strides "
                             f"{ancestor_bits.stride() if isinstance(ancestor_bits, torch.Tensor) else None}")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_lens=cache_lens, tree_mask=tree_mask,
                      ancestor_bits=ancestor_bits)
    if check_values(q) and (int(cache_lens.min()) < 0 or int(cache_lens.max()) + T > S):
        raise ValueError(f"cache_lens must be >= 0 and cache_lens + T must fit the cache's {S} slots, got "
                         f"cache_lens {cache_lens.tolist()} with T = {T}")
    if exact and tree_mask is not None and check_values(q) and bool(tree_mask.triu(1).any()):
        raise ValueError("exact tree attention needs parents before children (node i sees only nodes j <= i: a "
                         "lower-triangular tree_mask, as DFS pre-order gives)")
    if backend(q) == "triton" and (D <= MAX_HEAD_DIM or forced_kernels()):
        return launch(q, k_cache, v_cache, cache_lens, tree_mask, scale, ancestor_bits, exact=exact)
    return reference.tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale)
