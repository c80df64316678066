"""gumbel_noise: the counter-based Gumbel noise of seeded sampling, drawn in one kernel on CUDA.

The same function as lookahead.kernels.reference.gumbel_noise, lane for lane: a murmur3-finaliser hash of
(seed, row, absolute position, vocab id) in 32-bit arithmetic (int64 lanes masked to 32 bits), turned into
Gumbel(0, 1) = -log(-log(u)) in fp64 and rounded to fp32. Writing the [B, T, V] noise from one kernel avoids
the dozen [B, T, V] int64 temporaries of the torch version.
"""

from __future__ import annotations

import torch

import lookahead.kernels.reference as reference
from lookahead.kernels.dispatch import backend, check_int64, check_same_device, jit, tl, triton

_M32 = 0xFFFFFFFF


@jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


@jit
def _gumbel_noise_kernel(
    rows_ptr,      # [B] int64 row ids, contiguous
    pos_ptr,       # [B, T] int64 absolute positions, contiguous
    out_ptr,       # [B, T, V] fp32, contiguous
    seeds_ptr,     # [B] int64 per-row seeds, contiguous (read only with PER_ROW_SEED)
    T, V,
    seed_lo, seed_hi,  # the seed's low and high 32 bits (one seed for every row)
    BLOCK_V: tl.constexpr,
    PER_ROW_SEED: tl.constexpr,
):
    bt = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row = tl.load(rows_ptr + bt // T)
    pos = tl.load(pos_ptr + bt)
    if PER_ROW_SEED:
        seed = tl.load(seeds_ptr + bt // T)
        seed_lo = seed & 0xFFFFFFFF
        seed_hi = (seed >> 32) & 0xFFFFFFFF
    key = _mix32((row * 0x9E3779B1 + pos + seed_lo * 0x632BE5AB) & 0xFFFFFFFF)
    v = offs.to(tl.int64)
    x = _mix32((key ^ ((v * 0x85EBCA77) & 0xFFFFFFFF)) & 0xFFFFFFFF)
    x = _mix32((x + 0x27D4EB2F + seed_hi) & 0xFFFFFFFF)
    u = (x.to(tl.float64) + 0.5) / 4294967296.0
    g = -tl.log(-tl.log(u))
    tl.store(out_ptr + bt.to(tl.int64) * V + offs, g.to(tl.float32), mask=offs < V)


def launch(seed: int | torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """The Triton launcher, for inputs gumbel_noise validated."""
    B, T = positions.shape
    rows, positions = rows.contiguous(), positions.contiguous()
    out = torch.empty(B, T, vocab, dtype=torch.float32, device=positions.device)
    block = min(1024, triton.next_power_of_2(vocab))  # vocab ids per program: a hand choice, not measured
    per_row = isinstance(seed, torch.Tensor)
    seeds = seed.contiguous() if per_row else rows  # (rows stands in for the unread pointer)
    scalar = 0 if per_row else seed
    _gumbel_noise_kernel[(B * T, triton.cdiv(vocab, block))](rows, positions, out, seeds, T, vocab, scalar & _M32,
                                                             scalar >> 32 & _M32, BLOCK_V=block,
                                                             PER_ROW_SEED=per_row)
    return out


def gumbel_noise(seed: int | torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, T, vocab] (fp32) for token positions [B, T] of rows [B] (int64); a pure function
    of (seed, row, position, vocab id), the same on every backend. seed: one int in [0, 2**64), or an int64
    tensor [B] of per-row seeds (a seed >= 2**63 as its two's-complement int64: the hash reads its 64 bits)."""
    check_int64("rows", rows, 1)
    check_int64("positions", positions, 2)
    if positions.shape[0] != rows.shape[0]:
        raise ValueError(f"positions has {positions.shape[0]} rows, rows has {rows.shape[0]}")
    if isinstance(seed, torch.Tensor):
        check_int64("seed", seed, 1)
        if seed.shape[0] != rows.shape[0]:
            raise ValueError(f"seed has {seed.shape[0]} per-row seeds, rows has {rows.shape[0]}")
        check_same_device(seed=seed, rows=rows)
    elif not isinstance(seed, int) or seed < 0 or seed >= 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64) or an int64 tensor of per-row seeds, got {seed!r}")
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"vocab must be an int >= 1, got {vocab!r}")
    check_same_device(rows=rows, positions=positions)
    if backend(positions) == "triton":
        return launch(seed, rows, positions, vocab)
    return reference.gumbel_noise(seed, rows, positions, vocab)
