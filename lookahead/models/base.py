"""The decoder-only transformer shared by every family: config, RoPE, attention over the static cache, MLP,
the three forward modes (full, prefill, verify a draft tree), loading and `generate`.

A family (llama.py, glm.py) says which `model_type`s it serves, how a `config.json` maps onto `ModelConfig`,
and how checkpoint tensor names map onto ours; everything else lives here once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lookahead import kernels
from lookahead.cache import KVCache
from lookahead.models.checkpoint import load_config, load_state_dict, resolve_checkpoint
from lookahead.state import GenerationState
from lookahead.trie import TokenTrie

try:  # optional prefill kernel on CUDA
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
# oneDNN prepacked fp32 linear on CPU: about flat in cost from 1 to 8 rows (MKL's addmm is ~2x slower there)
# and batch-invariant (a row's result does not depend on the other rows), so verifying a draft tree of T
# nodes costs little more than one token and gives the same numbers as a one-token step.
_MKLDNN_LINEAR = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                  and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_params: dict = field(default_factory=dict)   # factor, low/high_freq_factor, original_max_position_embeddings
    rotary_dim: int | None = None                     # None = the whole head dim (partial rotary otherwise)
    rope_interleaved: bool = False                    # rotate (x0, x1), (x2, x3)... instead of the two halves
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sandwich_norms: bool = False                      # extra norms after attention and after the MLP (GLM-4-0414)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads ({self.n_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.n_kv_heads})")


def decoder_config(hf: dict, *, norm_eps: float, max_positions: int, **family) -> ModelConfig:
    """The fields every decoder family reads the same way from a config.json; `family` sets the rest (biases,
    rotary variant, norms). norm_eps and max_positions are the family's defaults when the file omits them."""
    rope = rope_parameters(hf)
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        model_type=hf["model_type"],
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", norm_eps),
        max_position_embeddings=hf.get("max_position_embeddings", max_positions),
        rope_theta=rope["rope_theta"],
        rope_type=rope["rope_type"],
        rope_params=rope,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_token_id=eos_ids(hf.get("eos_token_id")),
        **family,
    )


def rope_parameters(hf: dict) -> dict:
    """RoPE settings from a config.json, in either the transformers 4 (`rope_theta`, `rope_scaling`) or the
    transformers 5 (`rope_parameters`) spelling."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.pop("type", None)
    return params


def eos_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [rotary_dim / 2] for the default, linear and llama3 RoPE variants."""
    dim = cfg.rotary_dim
    # computed on CPU even under a meta-device context (meta arange would import torch._dynamo: seconds)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    p = cfg.rope_params
    if cfg.rope_type == "default":
        pass
    elif cfg.rope_type == "linear":
        inv_freq = inv_freq / p["factor"]
    elif cfg.rope_type == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    else:
        raise ValueError(f"rope type {cfg.rope_type!r} is not supported (supported: default, linear, llama3)")
    return inv_freq.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@dataclass
class Step:
    """What one forward pass does with the cache, shared by every layer.

    mode "full": causal attention over input_ids only, no cache. "prefill": the rows start at slot 0,
    causal attention, K/V written at slots 0..T-1. "verify": K/V of the T nodes written at slots
    cache.lens[b] + i, attention through the tree-attention kernel over the committed prefix and the tree.
    """
    mode: str
    cos: torch.Tensor                      # [B, T, 1, rotary_dim] (already laid out for the rotation style)
    sin: torch.Tensor
    cache: KVCache | None = None
    slots: torch.Tensor | None = None      # [B, T] verify: cache slot of each node
    rows: torch.Tensor | None = None       # [B, 1] verify: arange(B)
    tree_mask: torch.Tensor | None = None  # [B, T, T] verify: node i sees node j
    ancestor_bits: torch.Tensor | None = None  # the tree mask packed once for the Triton kernel (or None)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims of x [B, T, H, D]; the rest passes through."""
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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, causal=True)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if k.shape[1] != q.shape[1]:
        if _SDPA_HAS_GQA:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return out.transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


class Embedding(nn.Embedding):
    """nn.Embedding without the random init when built on the meta device (its first use imports torch._dynamo,
    seconds of a model load)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Linear(nn.Linear):
    """nn.Linear that runs through a oneDNN prepacked copy of its weight once `pack()` made one (fp32 CPU)."""

    packed: torch.Tensor | None = None
    _packed_version: int = -1

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # built on meta by from_pretrained: the checkpoint fills it, skip the init
            super().reset_parameters()

    def pack(self) -> None:
        w = self.weight
        if _MKLDNN_LINEAR and w.device.type == "cpu" and w.dtype == torch.float32 and not w.is_meta:
            self.packed, self._packed_version = torch.ops.mkldnn._reorder_linear_weight(w.detach()), w._version
        else:
            self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self._packed_version == self.weight._version and x.device.type == "cpu":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.interleaved = cfg.rope_interleaved
        self.wqkv = Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = rotate(q.view(B, T, self.n_heads, self.head_dim), step.cos, step.sin, self.interleaved)  # (B, T, Hq, D)
        k = rotate(k.view(B, T, self.n_kv_heads, self.head_dim), step.cos, step.sin, self.interleaved)  # (B, T, Hkv, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if step.mode == "verify":
            k_cache, v_cache = step.cache.buffer[self.layer]  # (B, Hkv, S, D) each
            k_cache[step.rows, :, step.slots] = k
            v_cache[step.rows, :, step.slots] = v
            y = kernels.tree_attention(q, k_cache, v_cache, step.cache.lens, step.tree_mask,
                                       ancestor_bits=step.ancestor_bits)
        else:
            if step.mode == "prefill":
                kv = step.cache.buffer[self.layer, :, :, :, :T]  # (2, B, Hkv, T, D)
                kv[0].copy_(k.transpose(1, 2))
                kv[1].copy_(v.transpose(1, 2))
            y = causal_attention(q, k, v)
        return self.wo(y.reshape(B, T, q_size))


class FeedForward(nn.Module):
    """SwiGLU with gate and up fused into one matmul (w13 = [gate; up])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = Linear(cfg.dim, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w2 = Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        if cfg.sandwich_norms:
            self.post_attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.post_ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.sandwich = cfg.sandwich_norms

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        h = self.attention(self.attention_norm(x), step)
        x = x + (self.post_attention_norm(h) if self.sandwich else h)
        h = self.feed_forward(self.ffn_norm(x))
        return x + (self.post_ffn_norm(h) if self.sandwich else h)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V]


class CausalLM(nn.Module):
    """Decoder-only transformer with a static KV cache and draft-tree verification."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.name_or_path = None
        self.state = GenerationState()  # trie, KV cache, CUDA graphs, cost curves, drafter calibration

    @property
    def trie(self) -> TokenTrie:
        """The token trie lookahead drafts from; persists across generate calls (assign a loaded one to warm up)."""
        return self.state.trie

    @trie.setter
    def trie(self, trie: TokenTrie) -> None:
        if not isinstance(trie, TokenTrie):
            raise ValueError(f"model.trie must be a lookahead.TokenTrie, got {type(trie).__name__}: use "
                             "model.trie.clear() to empty it or TokenTrie.load(path) to restore one")
        self.state.trie = trie

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    # ---- family hooks ------------------------------------------------------------------------------------
    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        raise NotImplementedError

    @classmethod
    def convert_state_dict(cls, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Checkpoint tensor names -> ours (fusing q/k/v and gate/up)."""
        raise NotImplementedError

    # ---- forward -----------------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, rot/2)
        if self.config.rope_interleaved:
            freqs = freqs.repeat_interleave(2, dim=-1)
        else:
            freqs = torch.cat((freqs, freqs), dim=-1)
        dtype = self.tok_embeddings.weight.dtype
        return freqs.cos().to(dtype)[:, :, None], freqs.sin().to(dtype)[:, :, None]  # (B, T, 1, rot)

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, step_kwargs: dict,
             logit_rows: torch.Tensor | None) -> torch.Tensor:
        cos, sin = self._rope(positions)
        step = Step(cos=cos, sin=sin, **step_kwargs)
        x = self.tok_embeddings(input_ids)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, step)
        if logit_rows is not None:  # only the rows asked for go through the LM head
            x = x[torch.arange(x.shape[0], device=x.device), logit_rows]  # (B, dim)
        return self.output(self.norm(x))

    def forward(self, input_ids: torch.Tensor) -> CausalLMOutput:
        """Full causal forward without a cache: logits [B, T, V] (parity and perplexity checks)."""
        self._check_ids(input_ids)
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        return CausalLMOutput(self._run(input_ids, positions, {"mode": "full"}, None))

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """input_ids [B, T] right-padded, lengths [B] real tokens per row -> logits [B, V] after each row's last
        real token. Writes K/V at slots 0..T-1 (padding slots are scratch) and sets cache.lens = lengths."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        logits = self._run(input_ids, positions, {"mode": "prefill", "cache": cache}, lengths - 1)
        cache.lens.copy_(lengths)
        return logits

    def verify(self, tokens: torch.Tensor, depths: torch.Tensor, cache: KVCache,
               tree_mask: torch.Tensor | None) -> torch.Tensor:
        """Forward over draft trees: tokens/depths [B, T] (node 0 = root), tree_mask [B, T, T] or None for a
        chain -> logits [B, T, V]. Node i is at position cache.lens + depths[:, i] and its K/V go to slot
        cache.lens + i; cache.lens is not advanced (compaction does that)."""
        B, T = tokens.shape
        offsets = torch.arange(T, device=tokens.device)
        slots = cache.lens[:, None] + offsets  # (B, T)
        step = {"mode": "verify", "cache": cache, "slots": slots, "tree_mask": tree_mask,
                "ancestor_bits": kernels.ancestor_bits(tree_mask),
                "rows": torch.arange(B, device=tokens.device)[:, None]}
        return self._run(tokens, cache.lens[:, None] + depths, step, None)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32):
            raise ValueError("input_ids must be an integer tensor of shape [batch, tokens], e.g. "
                             "tokenizer(text, return_tensors='pt').input_ids")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per row")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size}): "
                             "was it made with this model's tokenizer?")

    def kv_cache(self, batch: int, max_len: int) -> KVCache:
        """The model's static cache, reallocated only when it is too small or of another shape."""
        cfg, w = self.config, self.tok_embeddings.weight
        args = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, w.dtype, w.device)
        if self.state.cache is None or not self.state.cache.fits(*args):
            self.state.cache = self.state.graphs = None  # free the old buffer (and graphs on it) first
            self.state.cache = KVCache(*args)
        self.state.cache.reset()
        return self.state.cache

    def pack_weights(self) -> "CausalLM":
        """(Re)build the oneDNN prepacked weights of every linear layer (fp32 on CPU; a no-op elsewhere).
        Costs one extra copy of the linear weights in memory."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack()
        return self

    def _apply(self, fn, recurse=True):  # .to() / .float() / .cuda(): the packed copies would be stale
        for m in self.modules():
            if isinstance(m, Linear):
                m.packed = None
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)  # RoPE frequencies stay fp32
        return self

    # ---- loading -----------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in cls.model_types:
            raise ValueError(f"{cls.__name__} serves model_type {', '.join(cls.model_types)}; this checkpoint is "
                             f"{model_type!r}. Use the matching class from lookahead.models.")
        return cls.config_from_hf(hf)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype: torch.dtype | None = None, device=None):
        """Load an HF checkpoint dir, a .gguf file or the embedded "smollm2-135m-instruct"."""
        path = resolve_checkpoint(name_or_path)
        hf = load_config(path)
        cfg = cls.from_hf_config(hf)
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = default_dtype(hf, device)
        with torch.device("meta"):
            model = cls(cfg)
        try:
            sd = cls.convert_state_dict(load_state_dict(path), cfg)
        except KeyError as e:
            raise ValueError(f"checkpoint {path} lacks the tensor {e.args[0]!r}: is it complete and of type "
                             f"{cfg.model_type}?") from None
        result = model.load_state_dict(sd, assign=True, strict=False)
        if cfg.tie_word_embeddings:  # assign=True replaced the embedding Parameter: tie the new one
            model.output.weight = model.tok_embeddings.weight
        missing = [n for n in result.missing_keys if not (cfg.tie_word_embeddings and n == "output.weight")]
        if missing or result.unexpected_keys:
            raise ValueError(f"checkpoint {path} does not fit a {cfg.model_type} model: missing "
                             f"{missing[:4]}, unexpected {result.unexpected_keys[:4]}")
        model.inv_freq = rope_inv_freq(cfg)
        model.name_or_path = str(path)
        return model.to(device=device, dtype=dtype).eval().pack_weights()

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, **kwargs):
        """Greedy or sampled generation, lookahead on by default; see API.md."""
        from lookahead.generation import generate
        return generate(self, input_ids, **kwargs)


def default_dtype(hf: dict, device: torch.device) -> torch.dtype:
    """fp32 on CPU; on CUDA the checkpoint's half dtype, bf16 when it is stored in fp32."""
    if device.type != "cuda":
        return torch.float32
    stored = hf.get("dtype") or hf.get("torch_dtype")
    return torch.float16 if stored == "float16" else torch.bfloat16


def fuse_llama_style(sd: dict[str, torch.Tensor], cfg: ModelConfig, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """HF llama-style names -> ours: q/k/v_proj -> wqkv, gate/up_proj -> w13 (or an already fused gate_up_proj)."""
    out = {"tok_embeddings.weight": sd[f"{prefix}embed_tokens.weight"], "norm.weight": sd[f"{prefix}norm.weight"]}
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"{prefix}layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            parts = [sd.get(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            if all(p is not None for p in parts):
                out[f"{dst}attention.wqkv.{kind}"] = torch.cat(parts, dim=0)
            if f"{src}self_attn.o_proj.{kind}" in sd:
                out[f"{dst}attention.wo.{kind}"] = sd[f"{src}self_attn.o_proj.{kind}"]
            if f"{src}mlp.gate_up_proj.{kind}" in sd:
                out[f"{dst}feed_forward.w13.{kind}"] = sd[f"{src}mlp.gate_up_proj.{kind}"]
            elif f"{src}mlp.gate_proj.{kind}" in sd:
                out[f"{dst}feed_forward.w13.{kind}"] = torch.cat(
                    [sd[f"{src}mlp.gate_proj.{kind}"], sd[f"{src}mlp.up_proj.{kind}"]], dim=0)
            if f"{src}mlp.down_proj.{kind}" in sd:
                out[f"{dst}feed_forward.w2.{kind}"] = sd[f"{src}mlp.down_proj.{kind}"]
        out[f"{dst}attention_norm.weight"] = sd[f"{src}input_layernorm.weight"]
        out[f"{dst}ffn_norm.weight"] = sd[f"{src}post_attention_layernorm.weight"]
    return out

