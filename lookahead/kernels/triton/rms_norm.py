"""rms_norm: RMSNorm with one program per row, so a row's sum of squares never depends on how many rows there are.

torch's CUDA reduction sizes its thread block from the number of outputs too (ReduceConfig: block width =
512 threads / block height, the height grows with the rows), so `x.pow(2).mean(-1)` of the same row is summed
in another order at M = 1 than at M = 64. The exact verify step (LookaheadConfig.exact) uses this kernel
instead: the row's D values are reduced by one tl.sum over one block of next_power_of_2(D) lanes, whatever M.
Same math as lookahead.models.layers.RMSNorm: fp32 statistics, the normalised row cast to x's dtype, times weight.
"""

from __future__ import annotations

import torch

from lookahead.kernels.dispatch import backend, check_same_device, jit, tl, triton

MAX_DIM = 1 << 15  # one row lives in one block of registers; every model dim we serve is far below this


@jit
def _rms_norm_kernel(
    x_ptr,       # [M, D] rows (row stride stride_xm, elements contiguous)
    w_ptr,       # [D] weight, x's dtype
    out_ptr,     # [M, D] contiguous, x's dtype
    D, stride_xm, eps,
    BLOCK_D: tl.constexpr,  # next_power_of_2(D): the whole row in one block, lanes d >= D load 0
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    x = tl.load(x_ptr + row * stride_xm + offs, mask=ok, other=0.0).to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    y = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * D + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def launch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton launcher for 2-D x [M, D] with contiguous rows, validated by rms_norm."""
    M, D = x.shape
    out = torch.empty(M, D, dtype=x.dtype, device=x.device)
    if M:
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(M,)](x, weight, out, D, x.stride(0), eps, BLOCK_D=block,
                               num_warps=max(1, min(16, block // 256)), enable_fp_fusion=False)
    return out


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm in torch (lookahead.models.layers.RMSNorm.forward)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., D] with weight [D] -> [..., D] in x's dtype, each row reduced alone (Triton); the torch
    reference elsewhere (CPU reductions over a row do not depend on the row count)."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or x.dim() < 1:
        raise ValueError("rms_norm expects tensors x [..., D] and weight [D]")
    D = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != D:
        raise ValueError(f"weight must have shape ({D},) for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if not x.is_floating_point() or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one float dtype, got {x.dtype} and {weight.dtype}")
    if not (isinstance(eps, float) and eps >= 0):
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if D > MAX_DIM:
        raise ValueError(f"rms_norm takes rows of at most {MAX_DIM} values, got {D}")
    check_same_device(x=x, weight=weight)
    if backend(x) != "triton":
        return reference(x, weight, eps)
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return launch(rows, weight, eps).view(x.shape)
