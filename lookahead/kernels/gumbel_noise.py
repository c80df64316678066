"""gumbel_noise: the counter-based Gumbel noise of seeded sampling, drawn in one kernel on CUDA.

The same function as lookahead.sampling.gumbel_noise_torch, lane for lane: a murmur3-finaliser hash of
(seed, row, absolute position, vocab id) in 32-bit arithmetic (int64 lanes masked to 32 bits), turned into
Gumbel(0, 1) = -log(-log(u)) in fp64 and rounded to fp32. Writing the [B, T, V] noise from one kernel avoids
the dozen [B, T, V] int64 temporaries of the torch version.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_M32 = 0xFFFFFFFF


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _gumbel_noise_kernel(
    rows_ptr,      # [B] int64 row ids
    pos_ptr,       # [B, T] int64 absolute positions, contiguous
    out_ptr,       # [B, T, V] fp32, contiguous
    T, V,
    seed_lo, seed_hi,  # the seed's low and high 32 bits
    BLOCK_V: tl.constexpr,
):
    bt = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row = tl.load(rows_ptr + bt // T)
    pos = tl.load(pos_ptr + bt)
    key = _mix32((row * 0x9E3779B1 + pos + seed_lo * 0x632BE5AB) & 0xFFFFFFFF)
    v = offs.to(tl.int64)
    x = _mix32((key ^ ((v * 0x85EBCA77) & 0xFFFFFFFF)) & 0xFFFFFFFF)
    x = _mix32((x + 0x27D4EB2F + seed_hi) & 0xFFFFFFFF)
    u = (x.to(tl.float64) + 0.5) / 4294967296.0
    g = -tl.log(-tl.log(u))
    tl.store(out_ptr + bt.to(tl.int64) * V + offs, g.to(tl.float32), mask=offs < V)


def gumbel_noise(seed: int, rows: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise [B, T, vocab] fp32 for rows [B] (int64) and positions [B, T] (int64)."""
    if rows.dtype != torch.int64 or positions.dtype != torch.int64 or rows.dim() != 1 or positions.dim() != 2 \
            or positions.shape[0] != rows.shape[0]:
        raise ValueError(f"rows must be int64 [B] and positions int64 [B, T], got {rows.dtype} "
                         f"{tuple(rows.shape)} and {positions.dtype} {tuple(positions.shape)}")
    if not isinstance(seed, int) or seed < 0 or seed >= 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    B, T = positions.shape
    positions = positions.contiguous()
    out = torch.empty(B, T, vocab, dtype=torch.float32, device=positions.device)
    block = min(1024, triton.next_power_of_2(vocab))
    _gumbel_noise_kernel[(B * T, triton.cdiv(vocab, block))](rows, positions, out, T, vocab, seed & _M32,
                                                             seed >> 32 & _M32, BLOCK_V=block)
    return out
