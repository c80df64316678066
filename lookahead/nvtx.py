"""NVTX ranges for Nsight: on only when LOOKAHEAD_NVTX=1 and CUDA is available, otherwise free."""

from __future__ import annotations

import contextlib
import os

import torch

ENABLED = os.environ.get("LOOKAHEAD_NVTX") == "1" and torch.cuda.is_available()


@contextlib.contextmanager
def _range(name: str):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str):
    """A context manager marking `name` on the Nsight timeline (a no-op unless enabled)."""
    return _range(name) if ENABLED else contextlib.nullcontext()
