"""compact_kv: move each row's accepted K/V rows, in every layer, to the slots right after its prefix.

One program per (layer, k/v, row, kv head) plane and D block. The cache may be a view of a row range of a
bigger buffer (an engine steps over its busy rows): each [S, D] plane is contiguous, layers, k/v and rows are
strided. Invariant: nodes are in topological order, so
path is increasing and a source slot is never before its destination; but a slot can be both the source
of one move and the destination of another (path 0, 2, 3 moves 2 -> 1 and 3 -> 2). Every source row is
therefore loaded into registers, the program synchronises, and only then are rows stored. Rows already in
place (path[j] == j, the leading run) are neither loaded nor stored.
"""

from __future__ import annotations

import torch

import lookahead.kernels.reference as reference
from lookahead.kernels.dispatch import backend, check_int64, check_same_device, check_values, jit, tl, triton
from lookahead.config import MAX_TREE_NODES


@jit
def _compact_kv_kernel(
    cache_ptr,    # [L, 2, B, Hkv, S, D] K/V of every layer; [Hkv, S, D] contiguous per (layer, k/v, row)
    lens_ptr,     # [B] int64 committed length before the draft
    path_ptr,     # [B, T] int64 accepted nodes, root first, -1 padded
    num_ptr,      # [B] int64 nodes on the path
    B, H, S, D, T,
    stride_layer, stride_kv, stride_row,
    stride_lens, stride_path, stride_num,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    plane = tl.program_id(0)  # ((layer * 2 + kv) * B + row) * H + head
    head = plane % H
    row = (plane // H) % B
    kv = (plane // (H * B)) % 2
    layer = plane // (H * B * 2)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.load(num_ptr + row * stride_num)
    start = tl.load(lens_ptr + row * stride_lens)
    src = tl.load(path_ptr + row * stride_path + offs_t, mask=offs_t < T, other=0)
    move = (offs_t < n) & (src != offs_t)
    base = (cache_ptr + layer.to(tl.int64) * stride_layer + kv.to(tl.int64) * stride_kv
            + row.to(tl.int64) * stride_row + head.to(tl.int64) * S * D)
    mask = move[:, None] & (offs_d[None, :] < D)
    rows = tl.load(base + (start + src)[:, None] * D + offs_d[None, :], mask=mask)
    tl.debug_barrier()  # every source row is in registers before any destination is overwritten
    tl.store(base + (start + offs_t)[:, None] * D + offs_d[None, :], rows, mask=mask)


def launch(cache: torch.Tensor, cache_lens: torch.Tensor, path: torch.Tensor, num_accepted: torch.Tensor) -> None:
    """The Triton launcher, for inputs compact_kv validated."""
    L, _, B, H, S, D = cache.shape
    T = path.shape[1]
    if T > MAX_TREE_NODES:
        raise ValueError(f"compact_kv takes paths of at most {MAX_TREE_NODES} nodes, got {T}")
    if path.stride(1) != 1:
        path = path.contiguous()
    # a (BLOCK_T, BLOCK_D) tile of rows per program, D split in blocks of at most 128; T padded to a power of two,
    # at least 16. Hand choices, not swept (4.1 us at T = 64 over 32 layers x 8 kv heads x 128 on an H100,
    # bench/gpu/bench_kernels_h100.md)
    block_d = min(128, triton.next_power_of_2(D))
    grid = (L * 2 * B * H, triton.cdiv(D, block_d))
    _compact_kv_kernel[grid](cache, cache_lens, path, num_accepted, B, H, S, D, T,
                             cache.stride(0), cache.stride(1), cache.stride(2),
                             cache_lens.stride(0), path.stride(0), num_accepted.stride(0),
                             BLOCK_T=max(16, triton.next_power_of_2(T)), BLOCK_D=block_d)


def compact_kv(cache, cache_lens, path, num_accepted):
    """Move each row's accepted K/V rows to the slots right after its committed prefix, in place (docs/API.md)."""
    if not isinstance(cache, torch.Tensor) or cache.dim() != 6 or cache.shape[1] != 2:
        raise ValueError(f"cache must be [L, 2, B, Hkv, S, D], got {tuple(getattr(cache, 'shape', ()))}")
    if not cache[0, 0, 0].is_contiguous() or (cache.shape[2] > 1 and cache.stride(2) < cache[0, 0, 0].numel()):
        raise ValueError("cache must be the preallocated buffer or a row range of it ([Hkv, S, D] contiguous per "
                         "layer, k/v and row)")
    check_int64("cache_lens", cache_lens, 1)
    check_int64("path", path, 2)
    check_int64("num_accepted", num_accepted, 1)
    B = cache.shape[2]
    if cache_lens.shape[0] != B or path.shape[0] != B or num_accepted.shape[0] != B:
        raise ValueError(f"cache has {B} rows but cache_lens, path, num_accepted have "
                         f"{cache_lens.shape[0]}, {path.shape[0]}, {num_accepted.shape[0]}")
    check_same_device(cache=cache, cache_lens=cache_lens, path=path, num_accepted=num_accepted)
    if check_values(cache):
        T = path.shape[1]
        if bool(((num_accepted < 1) | (num_accepted > T)).any()):
            raise ValueError(f"num_accepted must be in [1, {T}]")
        if bool((cache_lens + path.max(dim=1).values + 1 > cache.shape[4]).any()):
            raise ValueError(f"cache_lens + path points past the cache's {cache.shape[4]} slots")
    if backend(cache) == "triton":
        return launch(cache, cache_lens, path, num_accepted)
    return reference.compact_kv(cache, cache_lens, path, num_accepted)
