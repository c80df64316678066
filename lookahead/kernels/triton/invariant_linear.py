"""invariant_linear: x @ weight.T + bias with a reduction over K that never depends on M or the other rows.

The exact (batch-invariant) verify step runs every linear layer through it, so a draft node verified among T
nodes gets the bits the one-token step that later decodes it gets (LookaheadConfig.exact). cuBLAS picks its
kernel, tile and split-K from M, so the same row comes out a few ulps apart at M = 1 and M = 64; here:
  - one tile shape per weight shape and dtype (`tile_config(N, K, dtype)`), never a function of M;
  - no split-K: one program owns an output tile and walks K from 0 to K in BLOCK_K steps, fp32 accumulator;
  - a row's products meet only its own row of x (rows are independent in tl.dot), the masked K tail adds 0.
So row r of the result is a function of x[r], weight and bias alone. The approach follows vLLM's
`batch_invariant.py` and Thinking Machines' `batch_invariant_ops` (fixed-config Triton matmuls), with the
tile sized for decode (M <= 128 rows, memory bound) rather than for large batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lookahead.kernels.dispatch import backend, check_same_device, jit, tl, triton

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_M = 16, tl.dot's minimum: a decode step has 1..128
# rows and is bound by reading the weight, so a taller tile would only multiply the wasted MMA work of the
# one-token step. Without split-K the programs are the N tiles alone: BLOCK_N = 32 below N = 16384 gives 128
# programs for N = 4096 (the 7B shape's wo and w2, about one per H100 SM), 64 above it (w13, wqkv of big models,
# the LM head: hundreds of programs either way, fewer and longer loads). BLOCK_K 128 (16-bit) / 64 (fp32) and 4
# stages keep 32-64 KiB of weight loads in flight a program. Chosen by these counts, NOT measured on a GPU yet (no
# GPU was lent to the session that wrote this): profiling/gpu_exact.py sweeps the alternatives per shape; a
# change only has to stay a function of (N, K, dtype), never of M.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tile_config(N: int, K: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """The one tile shape of a weight [N, K] of this dtype, for every M: (BLOCK_M, BLOCK_N, BLOCK_K, warps,
    stages). Depends on the weight only, never on the rows, which is what makes the result batch-invariant."""
    block_n = 64 if N >= 16384 else 32
    return (16, block_n, 64, 4, 3) if dtype == torch.float32 else (16, block_n, 128, 4, 4)


@jit
def _invariant_linear_kernel(
    x_ptr,      # [M, K] rows of the input (any strides)
    w_ptr,      # [N, K] weight, as nn.Linear stores it
    bias_ptr,   # [N] bias (unused unless HAS_BIAS)
    out_ptr,    # [M, N] result, x's dtype
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 (no tf32), "tf32" otherwise (ignored for 16-bit inputs)
):
    # axis 0 walks M: the programs that share a weight tile are launched together and hit it in L2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # the one K order of every row: 0, BLOCK_K, 2 BLOCK_K, ... (no split-K); lanes k >= K load 0 and add 0
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (M, K)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None] * stride_wk,
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)  # (K, N)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """The Triton launcher for 2-D x [M, K] that invariant_linear validated; config overrides tile_config
    (the GPU sweep in profiling/ only: a config that varied with M would break the invariance)."""
    M, K = x.shape
    N = weight.shape[0]
    block_m, block_n, block_k, warps, stages = config or tile_config(N, K, weight.dtype)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    _invariant_linear_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        x, weight, weight if bias is None else bias, out, M, N, K,
        *x.stride(), *weight.stride(), *out.stride(),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
        enable_fp_fusion=False)  # no contraction: the rounding cannot depend on a specialisation (M == 1)
    return out


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K], weight [N, K], bias [N] or None -> [..., N], where each row's
    result depends on that row alone (the Triton kernel; elsewhere F.linear, whose CPU fp32 path is already
    row-independent)."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError(f"x and weight must be tensors, got {type(x).__name__}, {type(weight).__name__}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"expected x [..., K] and weight [N, K] with the same K, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one of the dtypes {DTYPES}, got {x.dtype} and {weight.dtype}: "
                         "cast the input to the layer's dtype")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
                             or bias.dtype != x.dtype):
        raise ValueError(f"bias must be a {x.dtype} tensor of shape ({weight.shape[0]},), got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    check_same_device(x=x, weight=weight, bias=bias)
    if backend(x) != "triton":
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # (M, K), a view when x is contiguous
    return launch(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])
