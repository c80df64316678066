"""The knobs read from the environment, the cache directory, and the fixed limits every module imports."""

from __future__ import annotations

import os
from pathlib import Path

MAX_TREE_NODES = 128  # nodes of one verify tree, the root included: the Triton kernels' tile holds 128
LAYOUTS = ("hier", "par")  # draft tree layouts: the trie's shape, or independent root-to-leaf chains


def cache_dir() -> Path:
    """$LOOKAHEAD_CACHE (default ~/.cache/lookahead): converted checkpoints and measured cost curves."""
    return Path(os.environ.get("LOOKAHEAD_CACHE") or Path.home() / ".cache" / "lookahead")


def forced_kernels() -> str:
    """LOOKAHEAD_KERNELS: '' (Triton on CUDA, torch elsewhere), 'torch' or 'triton'."""
    forced = os.environ.get("LOOKAHEAD_KERNELS", "").lower()
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"LOOKAHEAD_KERNELS must be 'torch' or 'triton', got {forced!r}")
    return forced


def value_checks_on_cuda() -> bool:
    """LOOKAHEAD_CHECKS=1: kernel launchers also check tensor values on CUDA (a device-to-host sync each)."""
    return os.environ.get("LOOKAHEAD_CHECKS", "") == "1"


def cuda_graphs_enabled() -> bool:
    """LOOKAHEAD_CUDA_GRAPHS=0 turns the captured decode steps off (e.g. to see per-kernel NVTX ranges)."""
    return os.environ.get("LOOKAHEAD_CUDA_GRAPHS", "1") != "0"


def cpu_arch() -> str:
    """LOOKAHEAD_CPU_ARCH: the -march the C++ CPU ops are built for (default native: this host's ISA)."""
    arch = os.environ.get("LOOKAHEAD_CPU_ARCH", "native")
    if not arch.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"LOOKAHEAD_CPU_ARCH must be a -march name such as native or x86-64-v3, got {arch!r}")
    return arch
