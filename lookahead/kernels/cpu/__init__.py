"""The CPU path's ops in C++ (`torch.ops.lookahead_cpu.*`, the CPU implementations behind the op registry
`torch.ops.lookahead.*`, kernels/ops.py): the invariant linear layer, RMSNorm (with the residual add), silu(gate) * up,
RoPE with the K/V store, exact tree attention, and decode_layers (every decoder layer of a forward in one call).
Every value is computed in an order fixed by the data's own indices (common.h), so a verify step of T nodes gives
each node the bits of the one-token step that later decodes the same token, in fp32, bf16 and fp16.

The sources (every *.cpp here, in one unity unit per core) are compiled once per host by
`torch.utils.cpp_extension.load` (ninja, the system C++ compiler, `-march=native` or $LOOKAHEAD_CPU_ARCH) and
cached under $LOOKAHEAD_CACHE/cpu_ops in a directory keyed by the sources, the flags, torch, the compiler and the
CPU, so a fresh process only loads the library; the compiler's warnings are logged. Without a compiler the registry
runs torch references (`available()` is False; bf16 is then not bitwise lossless).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

from lookahead.config import cache_dir, cpu_arch

log = logging.getLogger("lookahead.kernels.cpu")

LIBRARY = "lookahead_cpu"
READY = "READY"  # written into a build directory once its library is complete
# -Wno-(maybe-)uninitialized: GCC 12's own AVX-512 headers make their "undefined" vectors by self-initialisation,
# which it reports at every inlined use (GCC bug 105593, fixed in GCC 13); the only warnings of these sources.
BASE_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-DNDEBUG", "-Wall", "-Wextra",
              "-Wno-unused-parameter", "-Wno-uninitialized", "-Wno-maybe-uninitialized")
# Per decoder layer, the tensors decode_layers takes, in this order (decoder.cpp's WEIGHT_NAMES; an absent bias or
# sandwich norm is an empty tensor). The model gathers its weights by these names.
LAYER_WEIGHTS = ("attention_norm", "wqkv", "wqkv_bias", "wo", "wo_bias", "ffn_norm", "w13", "w13_bias", "w2",
                 "w2_bias", "post_attention_norm", "post_ffn_norm", "wk", "wv", "w3")


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
    return str(torch.ops.lookahead_cpu.cpu_code_path()) if available() else None


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


def _sources() -> list[Path]:
    return sorted(Path(__file__).parent.glob("*.cpp"))


def _build_dir(cxx: str) -> Path:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for path in _sources() + sorted(here.glob("*.h")):
        digest.update(path.name.encode() + path.read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    for part in (flags(), torch.__version__, torch.__file__, version, cpu_name()):
        digest.update(repr(part).encode())
    return cache_dir() / "cpu_ops" / digest.hexdigest()[:16]


def _ninja_dir() -> str:
    """Where the ninja package (a dependency) put its binary, which cpp_extension runs from PATH."""
    try:
        import ninja
        return ninja.BIN_DIR
    except ImportError:  # a system ninja on PATH may still do
        return os.path.dirname(sys.executable)


def _units(build: Path) -> list[Path]:
    """The sources as one translation unit per core (unity build): each unit #includes its share of the *.cpp
    files, so torch's headers, about 7 of the ~12 s each source took to compile alone, are parsed once per unit.
    On this project's 2-core hosts a build takes ~20 s instead of ~50 s, and the test suite builds four (the native
    ops and the three other code paths). Sources go to units largest first, each to the lightest unit so far."""
    units: list[list[Path]] = [[] for _ in range(max(1, min(os.cpu_count() or 1, len(_sources()))))]
    for source in sorted(_sources(), key=lambda s: -s.stat().st_size):
        min(units, key=lambda u: sum(s.stat().st_size for s in u)).append(source)
    paths = []
    for i, unit in enumerate(units):
        path, text = build / f"unit{i}.cpp", "".join(f'#include "{source}"\n' for source in sorted(unit))
        if not path.exists() or path.read_text() != text:  # a process racing on this build writes the same text
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        paths.append(path)
    return paths


def _compile(cxx: str, build: Path) -> None:
    """Build and load the library with torch's cpp_extension: ninja compiles the units (`_units`) in parallel, its
    file lock serialises processes that race on one build directory. The compiler's warnings are logged; a
    finished build leaves READY beside the library, so another process loads only a complete one."""
    from torch.utils import cpp_extension

    build.mkdir(parents=True, exist_ok=True)
    log_path = build / "build.log"
    saved, saved_env = os.dup(1), {k: os.environ.get(k) for k in ("CXX", "PATH")}
    with open(log_path, "w") as out:
        os.dup2(out.fileno(), 1)  # ninja writes the compiler's output to file descriptor 1
        os.environ["CXX"] = cxx  # the compiler cpp_extension runs
        os.environ["PATH"] = os.pathsep.join([_ninja_dir(), os.environ.get("PATH", "")])  # a venv not activated
        try:
            cpp_extension.load(name=LIBRARY, sources=[str(u) for u in _units(build)], extra_cflags=list(flags()),
                               extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False,
                               verbose=True)
        except Exception as e:
            raise RuntimeError(f"{e}: {log_path.read_text()[-2000:]}") from None
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    for line in [line for line in log_path.read_text().splitlines() if "warning:" in line][:20]:
        log.warning("lookahead CPU ops: %s", line)
    (build / READY).touch()


def load() -> bool:
    """Build (once per host, cached) and load the ops; False, with one warning, where they cannot be built."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        try:
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler (g++, c++ or clang++; or set CXX)")
            build = _build_dir(cxx)
            _state["build"] = build.name
            if (build / READY).exists():
                torch.ops.load_library(str(build / f"{LIBRARY}.so"))
            else:
                log.info("building the CPU ops for %s (once per host, ~25 s on 2 cores)", cpu_name())
                _compile(cxx, build)
            names = tuple(torch.ops.lookahead_cpu.decode_layers_weights())
            if names != LAYER_WEIGHTS:
                raise RuntimeError(f"decode_layers takes its weights in the order {names}, the model gathers them "
                                   f"as {LAYER_WEIGHTS}: rebuild from one checkout")
            _state["ok"] = True
        except Exception as e:  # noqa: BLE001 - any failure leaves the torch path, said once
            log.warning("lookahead: the CPU ops could not be built (%s); the model runs torch ops instead, and "
                        "bf16/fp16 decoding on CPU is then not bitwise lossless", str(e).splitlines()[0][:300])
            _state["ok"] = False
        return bool(_state["ok"])


def available() -> bool:
    """Whether the C++ CPU ops are loaded (building them on first use)."""
    return load()


def build_id() -> str | None:
    """The loaded ops' build (a digest of their sources, flags, compiler, torch and CPU), or None where they are
    not available: cost curves are keyed by it, so a kernel change is priced by a new measurement."""
    return _state.get("build") if available() else None
