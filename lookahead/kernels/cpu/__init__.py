"""The CPU path's ops in C++ (`torch.ops.lookahead.*`): the invariant linear layer, RMSNorm (with the residual add),
silu(gate) * up, RoPE with the K/V store, and exact tree attention. Every value is computed in an order fixed by the
data's own indices (common.h), so a verify step of T nodes gives each node the bits of the one-token step that
later decodes the same token, in fp32, bf16 and fp16: the CPU twin of `LookaheadConfig(exact=True)` on CUDA.

The sources are compiled once per host by the system C++ compiler (`-march=native`: the host's own ISA, AVX-512
and AVX512_BF16 where present) against the installed torch, and cached under $LOOKAHEAD_CACHE/cpu_ops keyed by
the sources, the flags, torch, the compiler and the CPU, so a fresh process only loads the library. Without a
compiler the model falls back to torch ops (`available()` is False; bf16 is then not bitwise lossless).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from lookahead.settings import cache_dir, cpu_arch

log = logging.getLogger("lookahead.kernels.cpu")

SOURCES = ("linear.cpp", "norm.cpp", "attention.cpp", "decoder.cpp")
HEADERS = ("common.h", "ops.h")
BASE_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-std=c++17", "-DNDEBUG", "-w")


def flags() -> tuple[str, ...]:
    """Compiler flags: the host's own ISA (-march=native), or LOOKAHEAD_CPU_ARCH (e.g. x86-64-v3 for the AVX2 code
    path, x86-64-v4 for AVX-512 without BF16: how the tests cover the other hosts' code paths on one machine)."""
    return BASE_FLAGS + (f"-march={cpu_arch()}",)

_lock = threading.Lock()
_state: dict[str, object] = {}


def cpu_name() -> str:
    """The CPU's model name and the ISA features that decide a step's speed and the kernels' code paths."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = re.search(r"model name\s*:\s*(.*)", info)
    flags = re.search(r"flags\s*:\s*(.*)", info)
    have = set(flags.group(1).split()) if flags else set()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if f in have]
    return f"{name.group(1).strip() if name else 'unknown CPU'} [{' '.join(isa)}]"


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16) and the ops are built for it."""
    return cpu_arch() == "native" and ("avx512_bf16" in cpu_name() or "amx_bf16" in cpu_name())


# The code paths whose plain step is faster with bf16 weights than with fp32 ones (docs/hosts.md): a one-token step
# streams the weights, bf16 halves the bytes and is widened to fp32 exactly in registers, so both dtypes are
# lossless and bf16 wins wherever the widening is cheap. The portable path (ARM) is unmeasured: fp32 there.
BF16_CODE_PATHS = ("avx512_bf16", "avx512", "avx2")


def code_path() -> str | None:
    """The code path the C++ ops were compiled for ("avx512_bf16", "avx512", "avx2" or "portable", decided by the
    -march they were built with), or None where they are not available."""
    return str(torch.ops.lookahead.cpu_code_path()) if available() else None


def auto_dtype() -> tuple[torch.dtype, str]:
    """`dtype="auto"` on CPU and why: bf16 where the ops run a code path on which bf16 storage is the faster exact
    dtype (BF16_CODE_PATHS), fp32 elsewhere (and without the ops, where bf16 would not be bitwise lossless)."""
    path = code_path()
    if path is None:
        return torch.float32, "the C++ CPU ops are not available, and without them only fp32 is lossless"
    if path in BF16_CODE_PATHS:
        how = "multiplied natively" if path == "avx512_bf16" else "widened exactly in registers"
        return torch.bfloat16, (f"the ops run the {path} code path, where bf16 weights ({how}) read half the bytes "
                                f"of fp32 and the step is faster")
    return torch.float32, f"the ops run the {path} code path, where bf16 storage has not been measured faster"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _build_dir(cxx: str) -> Path:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((here / name).read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    for part in (flags(), torch.__version__, torch.__file__, version, cpu_name()):
        digest.update(repr(part).encode())
    return cache_dir() / "cpu_ops" / digest.hexdigest()[:16]


def _compile(cxx: str, out: Path) -> None:
    """Compile every source in parallel, then link; the library appears atomically (another process may race)."""
    here = Path(__file__).parent
    torch_dir = Path(torch.__file__).parent
    includes = [f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objects, jobs = [], []
        for src in SOURCES:
            obj = Path(tmp) / (src + ".o")
            objects.append(str(obj))
            jobs.append(subprocess.Popen([cxx, *flags(), *includes, abi, "-c", str(here / src), "-o", str(obj)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        errors = [err for job in jobs for _, err in [job.communicate()] if job.returncode]
        if errors:
            raise RuntimeError(errors[0][-4000:])
        lib = Path(tmp) / out.name
        link = subprocess.run([cxx, "-shared", "-fopenmp", *objects, "-o", str(lib), f"-L{torch_dir / 'lib'}",
                               "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"],
                              capture_output=True, text=True)
        if link.returncode:
            raise RuntimeError(link.stderr[-4000:])
        os.replace(lib, out)


def load() -> bool:
    """Build (once per host, cached) and load the ops; False, with one warning, where they cannot be built."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        try:
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler (g++, c++ or clang++; or set CXX)")
            lib = _build_dir(cxx) / "lookahead_cpu.so"
            if not lib.exists():
                log.info("building the CPU ops for %s (once per host, ~20 s)", cpu_name())
                _compile(cxx, lib)
            torch.ops.load_library(str(lib))
            _state["ok"] = True
        except Exception as e:  # noqa: BLE001 - any failure leaves the torch path, said once
            log.warning("lookahead: the CPU ops could not be built (%s); the model runs torch ops instead, and "
                        "bf16/fp16 decoding on CPU is then not bitwise lossless", str(e).splitlines()[0][:300])
            _state["ok"] = False
        return bool(_state["ok"])


def available() -> bool:
    """Whether the C++ CPU ops are loaded (building them on first use)."""
    return load()
