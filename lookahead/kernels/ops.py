"""The op registry: every op of a step defined once as `torch.ops.lookahead.<op>` (the schemas below), with one
implementation per device. The model calls these ops and never asks which backend runs them.

| op | CPU | CUDA |
|---|---|---|
| linear, rms_norm, add_rms_norm_, silu_mul, rope_store, tree_attention, decode_layers | the C++ ops (kernels/cpu) | Triton where exact mode asks for it (linear, rms_norm, tree_attention), torch otherwise |
| causal_attention (a prefill's, off the fused path) | torch's sdpa | flash-attn where installed, else sdpa |
| accept_longest_path, compact_kv | the C++ ops (kernels/cpu/accept.cpp, registered from C++), the torch references until they load | Triton (checked where LOOKAHEAD_CHECKS=1) |
| argmax (greedy targets), top_k_indices (recycled predictions) | the C++ ops (accept.cpp, registered from C++), torch references until they load | torch |
| quant_linear, quant_embedding (GGUF blocks, kernels/cpu/quant.cpp) | the C++ ops | none: quantized weights run on the CPU |

Where the C++ ops cannot be built (no compiler) or `LOOKAHEAD_KERNELS=torch` is set, the CPU runs the torch
references (reference.py), which are also what a CUDA device without triton runs. `decode_layers` (every decoder
layer of a forward in one C++ call: the CPU's one layer order, for steps, prompt chunks and full forwards) exists
on the CPU only: `fused_decoder(x)` says whether it runs for x; the model's layers (models/layers.py) serve every
other device. The weight order `decode_layers` expects is `LAYER_WEIGHTS`, checked against the C++ op's own list
(`lookahead_cpu::decode_layers_weights`) when the ops load.

tree_attention's ragged signature: q [B, T, Hq, D] with tree_mask [B, T, T] (or None: causal chains), or, with
rows and nodes [N], q [N, Hq, D] holding every row's tokens flattened (token n is node nodes[n] of cache row
rows[n]) and tree_mask [N, W] (token n sees node j of its own row). The C++ op takes both as they are; on CUDA
the ragged layout is padded to [R, W] rows for the Triton kernel and gathered back.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch
import torch.nn.functional as F

from lookahead.config import forced_kernels
import lookahead.kernels.cpu as cpu
import lookahead.kernels.reference as reference
from lookahead.kernels.triton.compact_kv import compact_kv
from lookahead.kernels.triton.accept_longest_path import accept_longest_path
from lookahead.kernels.triton.invariant_linear import invariant_linear
from lookahead.kernels.triton.rms_norm import rms_norm as triton_rms_norm
from lookahead.kernels.triton.tree_attention import ancestor_bits, tree_attention as triton_tree_attention

try:  # optional prefill kernel on CUDA
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

LAYER_WEIGHTS = cpu.LAYER_WEIGHTS  # decode_layers' weights per layer, in order

SCHEMAS = (
    "linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    "add_rms_norm_(Tensor(a!) x, Tensor h, Tensor weight, float eps) -> Tensor",
    "silu_mul(Tensor gate_up) -> Tensor",
    "rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
    "int n_heads, bool interleaved, Tensor? rows=None) -> Tensor",
    "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lens, Tensor? tree_mask, float scale, "
    "Tensor? rows=None, Tensor? nodes=None) -> Tensor",
    "causal_attention(Tensor q, Tensor k, Tensor v) -> Tensor",
    "decode_layers(Tensor(a!) x, Tensor[] weights, Tensor cos, Tensor sin, Tensor(b!) cache, Tensor lens, "
    "Tensor slots, Tensor? tree_mask, int n_heads, bool interleaved, float eps, Tensor final_norm, "
    "Tensor? rows=None, Tensor? nodes=None) -> Tensor",
    "accept_longest_path(Tensor draft_tokens, Tensor parents, Tensor target_tokens) -> (Tensor, Tensor)",
    "quant_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "quant_embedding(Tensor weight, Tensor ids, ScalarType dtype) -> Tensor",
    "compact_kv(Tensor(a!) cache, Tensor lens, Tensor path, Tensor num_accepted) -> ()",
    "argmax(Tensor logits) -> Tensor",
    "top_k_indices(Tensor logits, int k) -> Tensor",
)

_exact = contextvars.ContextVar("lookahead_exact", default=False)


@contextlib.contextmanager
def exact_mode(on: bool = True):
    """Within it, the CUDA implementations run batch-invariant (`LookaheadConfig(exact=True)`, `model.set_exact`);
    the CPU ones always are."""
    token = _exact.set(on)
    try:
        yield
    finally:
        _exact.reset(token)


_UNSET = object()
_native_memo: list = [_UNSET, False]  # the LOOKAHEAD_KERNELS value last seen, and _native's answer for it


def _native(t: torch.Tensor) -> bool:
    """Whether the C++ ops run for a CPU tensor t (built here, and not forced off by LOOKAHEAD_KERNELS=torch);
    decided again only when the variable changes."""
    forced = os.environ.get("LOOKAHEAD_KERNELS")
    if _native_memo[0] is _UNSET or _native_memo[0] != forced:
        _native_memo[:] = [forced, forced_kernels() != "torch" and cpu.available()]
    return _native_memo[1]


def fused_decoder(x: torch.Tensor) -> bool:
    """Whether `decode_layers` runs for x: on the CPU where the C++ ops run. There a prompt may also be prefilled
    as verify chains (tree attention over the key sequence makes a chunk's bits independent of where chunks end)."""
    return x.device.type == "cpu" and _native(x)


# ---- torch references (the CPU without C++ ops; CUDA where no Triton kernel serves) -------------------------------
def _rms_norm_torch(x, weight, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _silu_mul_torch(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate(x, cos, sin, interleaved):
    """RoPE on the first cos.shape[-1] dims of x [..., H, D] with cos/sin [..., R]; the rest passes through.
    transformers' rounding: x * cos and rotate(x) * sin each rounded to the dtype, then their sum."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    out = xr * cos + rotated * sin
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out


def _rope_store_torch(qkv, cos, sin, k_cache, v_cache, slots, n_heads, interleaved, rows=None):
    B, T, _ = qkv.shape
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    q, k, v = qkv.split([n_heads * D, Hkv * D, Hkv * D], dim=-1)
    q = _rotate(q.view(B, T, n_heads, D), cos, sin, interleaved)  # (B, T, Hq, D)
    k = _rotate(k.view(B, T, Hkv, D), cos, sin, interleaved)  # (B, T, Hkv, D)
    row = torch.arange(B, device=qkv.device)[:, None] if rows is None else rows.view(B, T)  # (B, T) or (B, 1)
    k_cache[row, :, slots] = k
    v_cache[row, :, slots] = v.view(B, T, Hkv, D)
    return q


def _padded_mask(tree_mask, rows, nodes, R):
    """The ragged layout's mask as padded rows [R, W, W] (a padding node sees only itself)."""
    W = int(nodes.max()) + 1 if tree_mask is None else tree_mask.shape[1]
    mask = torch.eye(W, dtype=torch.bool, device=nodes.device).repeat(R, 1, 1)  # (R, W, W)
    mask[rows, nodes] = (torch.arange(W, device=nodes.device)[None] <= nodes[:, None] if tree_mask is None
                         else tree_mask)
    return mask


_pad_memo: list = [None, None, None]  # the last (nodes, tree_mask) and its padded mask: one per forward, not per layer


def _tree_attention_padded(q, k_cache, v_cache, lens, tree_mask, scale, rows, nodes, attend):
    if rows is None:
        return attend(q, k_cache, v_cache, lens, tree_mask, scale)
    R = k_cache.shape[0]
    if _pad_memo[0] is not nodes or _pad_memo[1] is not tree_mask:  # a new forward: pad its mask once
        _pad_memo[:] = [nodes, tree_mask, _padded_mask(tree_mask, rows, nodes, R)]
    mask = _pad_memo[2]
    padded = q.new_zeros(R, mask.shape[1], *q.shape[1:])  # (R, W, Hq, D)
    padded[rows, nodes] = q
    return attend(padded, k_cache, v_cache, lens, mask, scale)[rows, nodes]  # (N, Hq, D)


def _argmax_torch(logits):
    """logits.argmax(-1); bf16/fp16 read in fp32 on the CPU (the same first maximum: widening is exact; torch's
    half-precision argmax there is ~3x slower than a float copy and its argmax)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float16):
        return logits.float().argmax(-1)
    return logits.argmax(-1)


def _top_k_indices_torch(logits, k):
    """The indices of each row's k largest logits, largest first, equal values by index (the C++ op's order; torch.topk
    leaves the order of equal values open): a stable descending sort."""
    return logits.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def _top_k_indices_cuda(logits, k):
    return logits.topk(k, dim=-1).indices  # equal values in any order: only drafts, never outputs, depend on it


def _causal_attention_torch(q, k, v):
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]: a prefill's attention over the tokens just written."""
    out = reference.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)  # (B, Hq, T, D)
    return out.transpose(1, 2)


def _causal_attention_cuda(q, k, v):
    if flash_attn_func is not None and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, causal=True)
    return _causal_attention_torch(q, k, v)


def _tree_attention_torch(q, k_cache, v_cache, lens, tree_mask, scale, rows=None, nodes=None):
    return _tree_attention_padded(q, k_cache, v_cache, lens, tree_mask, scale, rows, nodes, reference.tree_attention)


_bits_memo: list = [None, None]  # the last tree mask and its ancestor bits: every layer of a forward shares them


def _triton_attend(q, k_cache, v_cache, lens, tree_mask, scale):
    bits = None
    if tree_mask is not None:
        if _bits_memo[0] is not tree_mask:
            _bits_memo[:] = [tree_mask, ancestor_bits(tree_mask)]
        bits = _bits_memo[1]
    return triton_tree_attention(q, k_cache, v_cache, lens, tree_mask, scale, ancestor_bits=bits,
                                 exact=_exact.get())


# ---- implementations per device ------------------------------------------------------------------------------
def _cpu_impl(name: str, fallback):
    def run(*args):
        if _native(args[0]):
            return getattr(torch.ops.lookahead_cpu, name)(*args)
        return fallback(*args)
    return run


def _cpu_only(name: str):
    def run(*args):
        raise NotImplementedError(f"{name} takes GGUF blocks (uint8 weights), which run on the CPU's C++ ops only: "
                                  "load the model with quantization=None for another device")
    return run


def _no_fused(*args):
    raise NotImplementedError("decode_layers runs where the C++ CPU ops do (kernels.fused_decoder(x)); the model's "
                              "layers serve every other device")


def _linear_cuda(x, weight, bias):
    return invariant_linear(x, weight, bias) if _exact.get() else F.linear(x, weight, bias)


def _rms_norm_cuda(x, weight, eps):
    return triton_rms_norm(x, weight, float(eps)) if _exact.get() else _rms_norm_torch(x, weight, eps)


def _add_rms_norm_(x, h, weight, eps, norm):
    x.add_(h)
    return norm(x, weight, eps)


def _tree_attention_cuda(q, k_cache, v_cache, lens, tree_mask, scale, rows=None, nodes=None):
    return _tree_attention_padded(q, k_cache, v_cache, lens, tree_mask, scale, rows, nodes, _triton_attend)


IMPLS = {  # op: (CPU, CUDA)
    "linear": (_cpu_impl("linear", F.linear), _linear_cuda),
    "rms_norm": (_cpu_impl("rms_norm", _rms_norm_torch), _rms_norm_cuda),
    "add_rms_norm_": (_cpu_impl("add_rms_norm_", lambda x, h, w, eps: _add_rms_norm_(x, h, w, eps, _rms_norm_torch)),
                      lambda x, h, w, eps: _add_rms_norm_(x, h, w, eps, _rms_norm_cuda)),
    "silu_mul": (_cpu_impl("silu_mul", _silu_mul_torch), _silu_mul_torch),
    "rope_store": (_cpu_impl("rope_store", _rope_store_torch), _rope_store_torch),
    "tree_attention": (_cpu_impl("tree_attention", _tree_attention_torch), _tree_attention_cuda),
    "causal_attention": (_causal_attention_torch, _causal_attention_cuda),
    "decode_layers": (None, _no_fused),  # CPU: kernels/cpu/registry.cpp registers the C++ op (FALLBACKS)
    "accept_longest_path": (None, accept_longest_path),  # CPU: kernels/cpu/accept.cpp registers it (FALLBACKS)
    "compact_kv": (None, compact_kv),
    "argmax": (None, _argmax_torch),  # CPU: kernels/cpu/accept.cpp registers it (FALLBACKS)
    "top_k_indices": (None, _top_k_indices_cuda),
    "quant_linear": (None, _cpu_only("quant_linear")),  # CPU: registry.cpp registers the C++ ops (FALLBACKS)
    "quant_embedding": (None, _cpu_only("quant_embedding")),
}

# Ops whose C++ CPU kernels register themselves with the dispatcher when the library loads (no Python frame between
# the step and them); until then, and where they cannot be built, these references serve the CPU.
FALLBACKS = {"accept_longest_path": reference.accept_longest_path, "compact_kv": reference.compact_kv,
             "argmax": _argmax_torch, "top_k_indices": _top_k_indices_torch, "decode_layers": _no_fused,
             "quant_linear": _cpu_only("quant_linear"), "quant_embedding": _cpu_only("quant_embedding")}

_lib = torch.library.Library("lookahead", "DEF")
for _schema in SCHEMAS:
    _name = _schema.split("(", 1)[0]
    _lib.define(_schema)
    _cpu_fn, _cuda_fn = IMPLS[_name]
    if _cpu_fn is not None:
        _lib.impl(_name, _cpu_fn, "CPU")
    _lib.impl(_name, _cuda_fn, "CUDA")
for _name, _fallback in FALLBACKS.items():
    _lib.impl(_name, _fallback, "CompositeExplicitAutograd")
