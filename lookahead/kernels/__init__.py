"""The three ops of a lookahead step. CUDA tensors run the Triton kernels, others the torch references;
LOOKAHEAD_KERNELS=torch|triton forces one (triton on CPU needs TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import torch

from lookahead.kernels import reference

try:  # the Triton launchers; imported first so that the ops defined below take their module names
    from lookahead.kernels import accept_longest_path as _accept_module
    from lookahead.kernels import compact_kv as _compact_module
    from lookahead.kernels import tree_attention as _attention_module
except ImportError:  # no triton on this platform: the torch references serve every device
    _accept_module = _compact_module = _attention_module = None


def _backend(t: torch.Tensor) -> str:
    forced = os.environ.get("LOOKAHEAD_KERNELS", "").lower()
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"LOOKAHEAD_KERNELS must be 'torch' or 'triton', got {forced!r}")
    backend = forced or ("triton" if t.is_cuda else "torch")
    if backend == "triton" and _accept_module is None:
        raise ValueError("the Triton kernels need the triton package: pip install triton (Linux)")
    return backend


def _check_values(t: torch.Tensor) -> bool:
    """Checks that read tensor values (lengths, parents) need a device-to-host sync: always on CPU, on CUDA only
    with LOOKAHEAD_CHECKS=1 (the generation loop builds valid inputs; a sync per layer would cost the step)."""
    return not t.is_cuda or os.environ.get("LOOKAHEAD_CHECKS", "") == "1"


def _int64(name: str, t: torch.Tensor, dims: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != dims:
        raise ValueError(f"{name} must be an int64 tensor with {dims} dims, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


def _same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}; move them to one device")


def ancestor_bits(tree_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The tree mask packed for the Triton tree_attention ([B, T, ceil(T / 64)] int64 bit-vectors), or None
    where the torch reference will run. A model packs it once per step and passes it to every layer."""
    if tree_mask is None or _attention_module is None or _backend(tree_mask) != "triton":
        return None
    return _attention_module.build_ancestor_bits(tree_mask)


def tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale=None, *, ancestor_bits=None):
    """Attention of T draft nodes over the committed prefix and their tree ancestors (API.md). ancestor_bits:
    optional, `ancestor_bits(tree_mask)` computed once per step (the Triton kernel packs the mask otherwise)."""
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"expected q [B, T, Hq, D] and k/v_cache [B, Hkv, S, D] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, T, Hq, D = q.shape
    Bk, Hkv, S, Dk = k_cache.shape
    if Bk != B or Dk != D or Hq % Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}: batch and head dim "
                         "must match and Hq must be a multiple of Hkv")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype or not q.is_floating_point():
        raise ValueError(f"q, k_cache and v_cache must share one float dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    _int64("cache_lens", cache_lens, 1)
    if cache_lens.shape[0] != B:
        raise ValueError(f"cache_lens has {cache_lens.shape[0]} rows, q has {B}")
    if tree_mask is not None and (tree_mask.dtype != torch.bool or tuple(tree_mask.shape) != (B, T, T)):
        raise ValueError(f"tree_mask must be bool [B, T, T] = {(B, T, T)}, got {tree_mask.dtype} "
                         f"{tuple(tree_mask.shape)}")
    _same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_lens=cache_lens, tree_mask=tree_mask)
    if _check_values(q) and (int(cache_lens.min()) < 0 or int(cache_lens.max()) + T > S):
        raise ValueError(f"cache_lens must be >= 0 and cache_lens + T must fit the cache's {S} slots, got "
                         f"cache_lens {cache_lens.tolist()} with T = {T}")
    backend = _backend(q)
    if backend == "triton" and D not in _attention_module.HEAD_DIMS and not os.environ.get("LOOKAHEAD_KERNELS"):
        backend = "torch"  # head dims the kernel does not tile (80, 96, ...): the reference serves them
    if backend == "triton":
        if ancestor_bits is not None and (ancestor_bits.dtype != torch.int64 or ancestor_bits.shape[:2] != (B, T)):
            raise ValueError(f"ancestor_bits must be int64 [B, T, W] from lookahead.kernels.ancestor_bits, got "
                             f"{ancestor_bits.dtype} {tuple(ancestor_bits.shape)}")
        return _attention_module.tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale,
                                                ancestor_bits=ancestor_bits)
    return reference.tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale)


def accept_longest_path(draft_tokens, parents, target_tokens):
    """Deepest draft node whose whole path matches the model's own tokens (API.md)."""
    for name, t in (("draft_tokens", draft_tokens), ("parents", parents), ("target_tokens", target_tokens)):
        _int64(name, t, 2)
    if parents.shape != draft_tokens.shape or target_tokens.shape != draft_tokens.shape:
        raise ValueError(f"draft_tokens, parents and target_tokens must share [B, T], got "
                         f"{tuple(draft_tokens.shape)}, {tuple(parents.shape)}, {tuple(target_tokens.shape)}")
    _same_device(draft_tokens=draft_tokens, parents=parents, target_tokens=target_tokens)
    if _check_values(parents):
        T = parents.shape[1]
        idx = torch.arange(T, device=parents.device)
        bad = (parents[:, 0] != -1).any() | ((parents[:, 1:] >= idx[1:]) | (parents[:, 1:] < -1)).any()
        if bool(bad):
            raise ValueError("parents must satisfy parents[b, 0] = -1 and -1 <= parents[b, i] < i (topological "
                             "order; -1 marks padding)")
    if _backend(draft_tokens) == "triton":
        return _accept_module.accept_longest_path(draft_tokens, parents, target_tokens)
    return reference.accept_longest_path(draft_tokens, parents, target_tokens)


def compact_kv(cache, cache_lens, path, num_accepted):
    """Move each row's accepted K/V rows to the slots right after its committed prefix, in place (API.md)."""
    if not isinstance(cache, torch.Tensor) or cache.dim() != 6 or cache.shape[1] != 2:
        raise ValueError(f"cache must be [L, 2, B, Hkv, S, D], got {tuple(getattr(cache, 'shape', ()))}")
    if not cache.is_contiguous():
        raise ValueError("cache must be contiguous (the one preallocated buffer)")
    _int64("cache_lens", cache_lens, 1)
    _int64("path", path, 2)
    _int64("num_accepted", num_accepted, 1)
    B = cache.shape[2]
    if cache_lens.shape[0] != B or path.shape[0] != B or num_accepted.shape[0] != B:
        raise ValueError(f"cache has {B} rows but cache_lens, path, num_accepted have "
                         f"{cache_lens.shape[0]}, {path.shape[0]}, {num_accepted.shape[0]}")
    _same_device(cache=cache, cache_lens=cache_lens, path=path, num_accepted=num_accepted)
    if _check_values(cache):
        T = path.shape[1]
        if bool(((num_accepted < 1) | (num_accepted > T)).any()):
            raise ValueError(f"num_accepted must be in [1, {T}]")
        if bool((cache_lens + path.max(dim=1).values + 1 > cache.shape[4]).any()):
            raise ValueError(f"cache_lens + path points past the cache's {cache.shape[4]} slots")
    if _backend(cache) == "triton":
        return _compact_module.compact_kv(cache, cache_lens, path, num_accepted)
    return reference.compact_kv(cache, cache_lens, path, num_accepted)


__all__ = ["tree_attention", "accept_longest_path", "compact_kv", "ancestor_bits"]
