"""Memory by part: what a server's configuration sizes (weights, KV cache, trie, suffix automata, the largest
forward's activations) beside what the process holds (RSS), and the allocator's trimming.

The trie and the suffix automata are Python objects: their bytes are counts times bytes per node / token measured
with tracemalloc (the counts are exact; the per-unit bytes are the measured average). The workspace is the
activations of the largest forward the engine runs, estimated from its shapes (the dominant tensors only).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os

import torch

TRIE_NODE_BYTES = 52  # a trie node's bytes, measured by tracemalloc: docs/benchmarks.md#trie_node_bytes
SUFFIX_TOKEN_BYTES = 350  # a suffix automaton's bytes per token: docs/benchmarks.md#suffix_token_bytes


def _tensor_bytes(t: torch.Tensor, seen: set) -> int:
    """A tensor's storage bytes the first time its storage is seen, else 0 (tied and shared weights once)."""
    if t.is_meta:
        return 0
    try:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        size = storage.nbytes()
    except (RuntimeError, NotImplementedError):  # opaque layouts (mkldnn) have no storage: count the tensor itself
        key, size = ("opaque", id(t)), t.numel() * t.element_size()
    if key in seen:
        return 0
    seen.add(key)
    return size


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's weights: every unique tensor storage of its parameters and buffers, plus any prepacked
    copy a module keeps in an attribute named `packed` (a tensor, or a tuple / list / dict of tensors)."""
    seen: set = set()
    total = sum(_tensor_bytes(t, seen) for t in itertools.chain(model.parameters(), model.buffers()))
    for module in model.modules():
        packed = getattr(module, "packed", None)
        parts = packed.values() if isinstance(packed, dict) else packed if isinstance(packed, (tuple, list)) \
            else (packed,)
        total += sum(_tensor_bytes(p, seen) for p in parts if isinstance(p, torch.Tensor))
    return total


def workspace_bytes(cfg, tokens: int, keys: int, element_size: int) -> int:
    """Activations of one forward over `tokens` query tokens in all (rows x tokens per row), each attending over at
    most `keys` positions: the largest tensors alive at once (the fp32 logits of every token, the MLP's gate/up and
    its product, q/k/v, the attention scores of one layer), an estimate from shapes."""
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    per_token = 4 * cfg.vocab_size + element_size * (3 * cfg.intermediate_size + qkv + 4 * cfg.dim)
    scores = 4 * cfg.n_heads * keys  # fp32 scores of one layer, per query token
    return tokens * (per_token + scores)


def rss_bytes() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process, from /proc (0, 0 where there is none)."""
    current = peak = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    current = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return current, peak


_libc = None


def trim_allocator() -> bool:
    """Hand the C allocator's free memory back to the OS (glibc's malloc_trim(0)); False where there is none.
    glibc keeps what freed large activations leave in its heaps and arenas: without this the resident size
    follows the highest-water forward seen so far."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
        if _libc and not hasattr(_libc, "malloc_trim"):
            _libc = False
    return bool(_libc) and bool(_libc.malloc_trim(0))


def environment_allocator() -> str:
    """The allocator settings the process started with (LD_PRELOAD, glibc's MALLOC_* tunables), for the record."""
    keys = sorted(k for k in os.environ if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "GLIBC_TUNABLES"))
    return ", ".join(f"{k}={os.environ[k]}" for k in keys) or "glibc malloc, defaults"
