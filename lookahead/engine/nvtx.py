"""Named ranges around the parts of a decode step: NVTX for Nsight when LOOKAHEAD_NVTX=1 (CUDA), and
torch.profiler record_function ranges while a torch profiler is running; free otherwise."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.autograd.profiler as _profiler

NVTX = os.environ.get("LOOKAHEAD_NVTX") == "1" and torch.cuda.is_available()


@contextlib.contextmanager
def _nvtx(name: str):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str):
    """A context manager marking `name` on the Nsight / torch.profiler timeline (a no-op unless one is on)."""
    if NVTX:
        return _nvtx(name)
    if _profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
