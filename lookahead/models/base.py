"""The decoder-only transformer shared by every family: config, RoPE, attention over the static cache, MLP,
and the three forward modes (full, prefill, verify a draft tree).

A family (llama.py, glm.py) says which `model_type`s it serves, its part of the config.json -> ModelConfig
translation and how checkpoint tensor names map onto ours; loading.py does the rest of loading, once.
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
from lookahead.kernels import cpu as cpu_ops
from lookahead.kernels.reference import sdpa
from lookahead.state import GenerationState
from lookahead.trie import TokenTrie

try:  # optional prefill kernel on CUDA
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

ROPE_BLOCK = 256  # the RoPE table is computed in blocks of this many positions (see CausalLM._rope_table)


def cpu_path(x: torch.Tensor) -> bool:
    """Whether x runs the C++ CPU ops (lookahead.kernels.cpu): on CPU wherever they could be built."""
    return x.device.type == "cpu" and cpu_ops.available()


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
    exact: bool = False  # set_exact: one program per row (torch's CUDA reduction order depends on the row count)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_path(x):
            return torch.ops.lookahead.rms_norm(x.contiguous(), self.weight, self.eps)
        if self.exact and kernels.backend(x) == "triton":
            return kernels.rms_norm(x, self.weight, float(self.eps))
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@dataclass
class AttentionContext:
    """What every layer's attention shares in one forward pass.

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
    token_rows: torch.Tensor | None = None   # [N] ragged verify (x is [1, N, dim]): each token's cache row ...
    token_nodes: torch.Tensor | None = None  # [N] ... and node index; attention runs on rows padded to tree_mask's T


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
    out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)  # (B, Hq, T, D)
    return out.transpose(1, 2)


class Embedding(nn.Embedding):
    """nn.Embedding without the random init when built on the meta device (its first use imports torch._dynamo,
    seconds of a model load)."""

    act_dtype: torch.dtype | None = None  # a GGUF-quantized table (uint8 blocks, models/gguf.py): its rows' dtype

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.uint8:
            return torch.ops.lookahead.quant_embedding(self.weight, ids, self.act_dtype)
        return super().forward(ids)


class Linear(nn.Linear):
    """nn.Linear whose CPU path is the invariant C++ linear (a row's bits never depend on the other rows; the weight
    is read in place: no packed copy) and whose exact CUDA path is kernels.invariant_linear."""

    exact: bool = False  # set_exact: the batch-invariant GEMM where the Triton kernels run (CUDA)

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # built on meta by from_pretrained: the checkpoint fills it, skip the init
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_path(x):
            return torch.ops.lookahead.linear(x, self.weight, self.bias)
        if self.exact and kernels.backend(x) == "triton":
            return kernels.invariant_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    exact: bool = False  # set_exact: tree attention's EXACT mode

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.interleaved = cfg.rope_interleaved
        self.wqkv = Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if ctx.mode != "full" and cpu_path(x):
            return self.wo(self._cached_cpu(self.wqkv(x), ctx).reshape(B, T, q_size))
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = rotate(q.view(B, T, self.n_heads, self.head_dim), ctx.cos, ctx.sin, self.interleaved)  # (B, T, Hq, D)
        k = rotate(k.view(B, T, self.n_kv_heads, self.head_dim), ctx.cos, ctx.sin, self.interleaved)  # (B, T, Hkv, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if ctx.mode == "verify":
            k_cache, v_cache = ctx.cache.buffer[self.layer]  # (B, Hkv, S, D) each
            k_cache[ctx.rows, :, ctx.slots] = k
            v_cache[ctx.rows, :, ctx.slots] = v
            if ctx.token_rows is None:
                y = kernels.tree_attention(q, k_cache, v_cache, ctx.cache.lens, ctx.tree_mask,
                                           ancestor_bits=ctx.ancestor_bits, exact=self.exact)
            else:  # ragged: each row's tokens at their node index of rows padded to W nodes, then back
                R, W = ctx.tree_mask.shape[:2]
                padded = q.new_zeros(R, W, self.n_heads, self.head_dim)
                padded[ctx.token_rows, ctx.token_nodes] = q[0]
                y = kernels.tree_attention(padded, k_cache, v_cache, ctx.cache.lens, ctx.tree_mask,
                                           ancestor_bits=ctx.ancestor_bits, exact=self.exact)
                y = y[ctx.token_rows, ctx.token_nodes][None]  # (1, N, Hq, D)
        else:
            if ctx.mode == "prefill":
                kv = ctx.cache.buffer[self.layer, :, :, :, :T]  # (2, B, Hkv, T, D)
                kv[0].copy_(k.transpose(1, 2))
                kv[1].copy_(v.transpose(1, 2))
            y = causal_attention(q, k, v)
        return self.wo(y.reshape(B, T, q_size))


    def _cached_cpu(self, qkv: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The C++ CPU path of prefill and verify: RoPE and the K/V store in one op, then exact tree attention
        (verify) or causal attention over the slots just written (prefill) -> [B, T, Hq, D]."""
        k_cache, v_cache = ctx.cache.buffer[self.layer]  # (B, Hkv, S, D) each
        q = torch.ops.lookahead.rope_store(qkv, ctx.cos[:, :, 0], ctx.sin[:, :, 0], k_cache, v_cache, ctx.slots, self.n_heads,
                                           self.interleaved)  # (B, T, Hq, D)
        if ctx.mode == "verify":
            return torch.ops.lookahead.tree_attention(q, k_cache, v_cache, ctx.cache.lens, ctx.tree_mask,
                                                      self.head_dim ** -0.5)
        T = q.shape[1]
        return causal_attention(q, k_cache[:, :, :T].transpose(1, 2), v_cache[:, :, :T].transpose(1, 2))


class FeedForward(nn.Module):
    """SwiGLU with gate and up fused into one matmul (w13 = [gate; up])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = Linear(cfg.dim, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w2 = Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_path(x):
            return self.w2(torch.ops.lookahead.silu_mul(self.w13(x)))
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

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = self.attention(self.attention_norm(x), ctx)
        h = self.post_attention_norm(h) if self.sandwich else h
        if cpu_path(x):  # the residual add and the norm in one pass: x += h in place (x is this forward's own)
            h = self.feed_forward(torch.ops.lookahead.add_rms_norm_(x, h.contiguous(), self.ffn_norm.weight,
                                                                    self.ffn_norm.eps))
        else:
            x = x + h
            h = self.feed_forward(self.ffn_norm(x))
        return x + (self.post_ffn_norm(h) if self.sandwich else h)


def _or(t: torch.Tensor | None, none: torch.Tensor) -> torch.Tensor:
    return none if t is None else t


def _split_parts(linear: nn.Module, n: int, none: torch.Tensor) -> list[torch.Tensor]:
    """decode_layers' WK, WV (n = 2) or W3 (n = 1) slots: the other parts of a q/k/v or gate/up projection whose
    GGUF types differ (models/gguf.py's SplitLinear), else empty tensors."""
    rest = list(getattr(linear, "rest", ()))
    return rest + [none] * (n - len(rest))


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
        self._rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # _rope_table: cos, sin [P, rot]
        self._no_tensor = torch.empty(0)  # _layer_weights' stand-in for an absent bias or norm
        self._weights_list: tuple | None = None  # _layer_weights' last answer and the (dtype, device) it was for
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
        """The activations' dtype (a GGUF-quantized model's weights are uint8 blocks)."""
        weight = self.tok_embeddings.weight
        return self.tok_embeddings.act_dtype if weight.dtype == torch.uint8 else weight.dtype

    @property
    def prefill_in_verify(self) -> bool:
        """Whether an engine prefills through verify chains (`verify_ragged`): on the C++ CPU path, where tree
        attention over the key sequence gives a prompt token the bits of a one-token step wherever chunks end, so
        a prefill at `add` and one spread over decode steps agree bit for bit."""
        return cpu_path(self.tok_embeddings.weight)

    # ---- loading: the family hooks (loading.py's `Pretrained.from_pretrained` uses them) ---------------------
    @classmethod
    def family_config(cls, hf: dict) -> ModelConfig:
        """The family's part of config_from_hf: a config.json of one of its model_types -> ModelConfig."""
        raise NotImplementedError

    @classmethod
    def convert_state_dict(cls, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Checkpoint tensor names -> ours (fusing q/k/v and gate/up)."""
        raise NotImplementedError

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        """A config.json dict -> ModelConfig; ValueError unless this class serves its model_type."""
        model_type = hf.get("model_type")
        if model_type not in cls.model_types:
            raise ValueError(f"{cls.__name__} serves model_type {', '.join(cls.model_types)}; this checkpoint is "
                             f"{model_type!r}. Use the matching class from lookahead.models.")
        return cls.family_config(hf)

    # ---- forward -----------------------------------------------------------------------------------------
    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [..., rot] in the model's dtype of integer positions [...], laid out for the rotation."""
        freqs = positions[..., None].float() * self.inv_freq  # (..., rot/2)
        if self.config.rope_interleaved:
            freqs = freqs.repeat_interleave(2, dim=-1)
        else:
            freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)

    def _rope_table(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables [>= n, rot] for positions 0.., grown in blocks of ROPE_BLOCK positions. Every block is
        computed on a tensor of the same shape, so a position's values never depend on how far the table grew
        (a vectorised cos may round differently where a loop's tail falls)."""
        table = self._rope_tables
        if table is not None and (table[0].dtype != self.dtype or table[0].device != self.device):
            table = None
        have = 0 if table is None else table[0].shape[0]
        if have < n:
            blocks = [self._angles(torch.arange(p, p + ROPE_BLOCK, device=self.device))
                      for p in range(have, n, ROPE_BLOCK)]
            old = [] if table is None else [table]
            table = (torch.cat([t[0] for t in old] + [c for c, _ in blocks]),
                     torch.cat([t[1] for t in old] + [s for _, s in blocks]))
        self._rope_tables = table
        return table

    def _rope(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, T, 1, rot] of positions [B, T] (all < max_position). The CPU path reads them from the
        RoPE table, so a position gets the same bits in a one-token step and in a verify step of any size."""
        if cpu_path(positions):
            cos, sin = self._rope_table(max_position)
            return cos[positions][:, :, None], sin[positions][:, :, None]
        cos, sin = self._angles(positions)
        return cos[:, :, None], sin[:, :, None]  # (B, T, 1, rot)

    def _run(self, input_ids: torch.Tensor, ctx: AttentionContext,
             logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok_embeddings(input_ids)  # (B, T, dim)
        if ctx.mode == "verify" and cpu_path(x):  # every layer in one C++ call, the same ops as the modules below
            h = torch.ops.lookahead.decode_layers(
                x, self._layer_weights(), ctx.cos[:, :, 0], ctx.sin[:, :, 0], ctx.cache.buffer, ctx.cache.lens,
                ctx.slots, ctx.tree_mask, self.config.n_heads, self.config.rope_interleaved, self.config.norm_eps,
                self.norm.weight, ctx.token_rows, ctx.token_nodes)  # (B, T, dim), after the final norm
            if logit_rows is not None:
                h = h[0, logit_rows]  # (M, dim)
            return self.output(h)
        for layer in self.layers:
            x = layer(x, ctx)
        if logit_rows is not None and ctx.token_rows is not None:  # ragged: only the tokens asked for
            x = x[0, logit_rows]  # (M, dim)
        elif logit_rows is not None:  # only the rows asked for go through the LM head
            x = x[torch.arange(x.shape[0], device=x.device), logit_rows]  # (B, dim)
        return self.output(self.norm(x))

    def _layer_weights(self) -> list[torch.Tensor]:
        """Every layer's tensors in decode_layers' order (kernels/cpu/decoder.cpp); an absent one is empty. Kept
        between steps (gathering them through the modules costs about 1 ms of Python a step); `.to()` and the like
        (`_apply`) and `load_state_dict` make it anew, and so must anything else that puts a new Parameter object
        into a layer (`model._weights_list = None`)."""
        cached = self._weights_list
        if cached is not None and cached[1] == (self.dtype, self.device):
            return cached[0]
        none = self._no_tensor
        if none.dtype != self.dtype or none.device != self.device:
            none = self._no_tensor = torch.empty(0, dtype=self.dtype, device=self.device)
        out = []
        for layer in self.layers:
            a, f = layer.attention, layer.feed_forward
            out += [layer.attention_norm.weight, a.wqkv.weight, _or(a.wqkv.bias, none), a.wo.weight,
                    _or(a.wo.bias, none), layer.ffn_norm.weight, f.w13.weight, _or(f.w13.bias, none), f.w2.weight,
                    _or(f.w2.bias, none), layer.post_attention_norm.weight if layer.sandwich else none,
                    layer.post_ffn_norm.weight if layer.sandwich else none,
                    *_split_parts(a.wqkv, 2, none), *_split_parts(f.w13, 1, none)]
        self._weights_list = (out, (self.dtype, self.device))
        return out

    def forward(self, input_ids: torch.Tensor) -> CausalLMOutput:
        """Full causal forward without a cache: logits [B, T, V] (parity and perplexity checks)."""
        self._check_ids(input_ids)
        B, T = input_ids.shape
        cos, sin = self._rope(torch.arange(T, device=input_ids.device).expand(B, T), T)
        return CausalLMOutput(self._run(input_ids, AttentionContext("full", cos, sin)))

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """input_ids [B, T] right-padded, lengths [B] real tokens per row -> logits [B, V] after each row's last
        real token. Writes K/V at slots 0..T-1 (padding slots are scratch) and sets cache.lens = lengths."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T), also the K/V slots
        cos, sin = self._rope(positions, T)
        logits = self._run(input_ids, AttentionContext("prefill", cos, sin, cache, slots=positions),
                           logit_rows=lengths - 1)
        cache.lens.copy_(lengths)
        return logits

    def verify(self, tokens: torch.Tensor, depths: torch.Tensor, cache: KVCache,
               tree_mask: torch.Tensor | None) -> torch.Tensor:
        """Forward over draft trees: tokens/depths [B, T] (node 0 = root), tree_mask [B, T, T] or None for a
        chain -> logits [B, T, V]. Node i is at position cache.lens + depths[:, i] and its K/V go to slot
        cache.lens + i; cache.lens is not advanced (compaction does that)."""
        B, T = tokens.shape
        cos, sin = self._rope(cache.lens[:, None] + depths, cache.max_len)
        ctx = AttentionContext("verify", cos, sin, cache,
                               slots=cache.lens[:, None] + torch.arange(T, device=tokens.device),  # (B, T)
                               rows=torch.arange(B, device=tokens.device)[:, None],  # (B, 1)
                               tree_mask=tree_mask, ancestor_bits=kernels.ancestor_bits(tree_mask))
        return self._run(tokens, ctx)

    def verify_ragged(self, tokens: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor, depths: torch.Tensor,
                      cache: KVCache, tree_mask: torch.Tensor | None, logit_index: torch.Tensor | None = None,
                      ) -> torch.Tensor:
        """Forward over every row's tokens flattened into one dimension (no padding to the longest row): tokens,
        rows, nodes, depths [N]; token n is node nodes[n] of cache row rows[n], at position cache.lens[rows[n]] +
        depths[n], its K/V at slot cache.lens[rows[n]] + nodes[n]. tree_mask [N, W] bool: token n sees node j of
        its own row (itself and its ancestors; None = every row's tokens one causal chain). -> logits [M, V] of the
        tokens logit_index [M] (default all N): the LM head runs on those only. cache.lens is not advanced.
        A row may carry a causal chain (a prompt chunk) and a tree under its last token in the same step."""
        N = tokens.shape[0]
        lens = cache.lens[rows]  # (N,)
        positions = (lens + depths)[None]  # (1, N)
        cos, sin = self._rope(positions, cache.max_len)
        slots = (lens + nodes)[None]  # (1, N)
        if cpu_path(tokens):  # the C++ ops take the ragged layout as it is
            ctx = AttentionContext("verify", cos, sin, cache, slots=slots, rows=rows[None], tree_mask=tree_mask,
                                   token_rows=rows, token_nodes=nodes)
        else:  # the modules' attention pads rows to W nodes for the tree-attention kernel
            W = int(nodes.max()) + 1 if tree_mask is None else tree_mask.shape[1]
            padded = torch.eye(W, dtype=torch.bool, device=tokens.device).repeat(cache.batch, 1, 1)  # (R, W, W)
            padded[rows, nodes] = (torch.arange(W, device=tokens.device)[None] <= nodes[:, None] if tree_mask is None
                                   else tree_mask)
            ctx = AttentionContext("verify", cos, sin, cache, slots=slots, rows=rows[None], tree_mask=padded,
                                   ancestor_bits=kernels.ancestor_bits(padded), token_rows=rows, token_nodes=nodes)
        return self._run(tokens[None], ctx, logit_rows=logit_index if logit_index is not None else
                         torch.arange(N, device=tokens.device))

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
        """A static cache of `batch` rows of `max_len` slots for this model (prefill / verify by hand; generate's
        engine keeps its own)."""
        cfg = self.config
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, self.dtype, self.device)

    # ---- exactness ---------------------------------------------------------------------------------------
    @property
    def exact(self) -> bool:
        """Whether forwards run batch-invariant (set_exact)."""
        return self.output.exact

    def set_exact(self, on: bool) -> bool:
        """Batch-invariant forwards (LookaheadConfig.exact): where the Triton kernels run (CUDA), every linear layer
        goes through kernels.invariant_linear, every RMSNorm through kernels.rms_norm and tree attention runs its
        EXACT mode, so a node verified among T gets the bits of the one-token step that later decodes it and
        bf16/fp16 lookahead returns plain decoding's tokens (plain decoding must run with it on too). The torch
        path (CPU) is unchanged: it is exact already. Returns the previous setting; CUDA graphs captured before
        a change replay the old kernels, so the caller recaptures them."""
        if not isinstance(on, bool):
            raise ValueError(f"set_exact takes a bool, got {on!r}")
        previous = self.exact
        for m in self.modules():
            if isinstance(m, (Linear, RMSNorm, Attention)):
                m.exact = on
        return previous

    # ---- weights -------------------------------------------------------------------------------------------
    def load_state_dict(self, *args, **kwargs):
        """nn.Module's, then the decode step's weight list is gathered anew (assign=True puts new Parameters in)."""
        result = super().load_state_dict(*args, **kwargs)
        self._weights_list = None
        return result

    def _apply(self, fn, recurse=True):
        """.to() / .float() / .cuda() / ...: the RoPE frequencies stay fp32 and the RoPE table is made anew."""
        super()._apply(fn, recurse)
        self._rope_tables = self._weights_list = None
        if self.tok_embeddings.weight.dtype == torch.uint8:  # GGUF blocks stay; activations follow the norms' dtype
            self.tok_embeddings.act_dtype = self.norm.weight.dtype
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)  # RoPE frequencies stay fp32
        return self

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, **kwargs):
        """Greedy or sampled generation, lookahead on by default; see docs/API.md."""
        from lookahead.generation import generate
        return generate(self, input_ids, **kwargs)
