"""Which backend runs an op, and the input checks every op shares.

An op runs its Triton kernel on CUDA tensors when triton is installed, its torch reference otherwise (triton is
Linux-only, pyproject.toml); LOOKAHEAD_KERNELS=torch|triton forces one (triton on CPU needs TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from lookahead.config import forced_kernels, value_checks_on_cuda

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton on this platform: the kernels stay plain functions that backend() never picks
    triton = tl = None

HAS_TRITON = triton is not None


def jit(fn):
    """triton.jit; without triton the function itself, so that the op modules import on every platform."""
    return triton.jit(fn) if HAS_TRITON else fn


def backend(t: torch.Tensor) -> str:
    """'triton' or 'torch' for an op on tensor t."""
    forced = forced_kernels()
    if forced == "triton" and not HAS_TRITON:
        raise ValueError("LOOKAHEAD_KERNELS=triton needs the triton package (Linux: pip install triton); unset "
                         "it or set LOOKAHEAD_KERNELS=torch to run the torch kernels")
    return forced or ("triton" if t.is_cuda and HAS_TRITON else "torch")


def check_values(t: torch.Tensor) -> bool:
    """Whether to run the checks that read tensor values (lengths, parents): each is a device-to-host sync, so on
    CUDA only with LOOKAHEAD_CHECKS=1 and never while a CUDA graph is being captured (a sync there fails)."""
    if not t.is_cuda:
        return True
    return value_checks_on_cuda() and not torch.cuda.is_current_stream_capturing()


def check_int64(name: str, t: torch.Tensor, dims: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != dims:
        raise ValueError(f"{name} must be an int64 tensor with {dims} dims, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}; move them to one device")
