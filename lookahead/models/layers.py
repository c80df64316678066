"""The decoder's layers. Each calls the op registry (`torch.ops.lookahead.*`, lookahead/kernels/ops.py) and never
asks which backend runs it: the C++ ops on a CPU, Triton or torch on CUDA. These modules are the layer order on
every device but the CPU, where one C++ call (`decode_layers`) runs all layers of a forward in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lookahead.models.cache import KVCache
from lookahead.models.config import ModelConfig

@dataclass
class AttentionContext:
    """What every layer's attention shares in one forward pass. The step's tokens are [B, T] (padded rows) or
    [1, N] (ragged: `rows` and `nodes` [N] say each token's cache row and node index).

    mode "prefill": the rows start at slot 0 and attend causally over the slots just written. "verify": token i's
    K/V go to slot `slots[b, i]` and it attends over the committed prefix (`lens`) and its tree ancestors.
    """
    mode: str
    cos: torch.Tensor                       # [B, T, rotary_dim] (laid out for the rotation style)
    sin: torch.Tensor
    cache: KVCache
    slots: torch.Tensor                     # [B, T] cache slot of each token
    lens: torch.Tensor                      # [R] committed length of each cache row the attention starts from
    tree_mask: torch.Tensor | None = None   # [B, T, T] or ragged [N, W]: token i sees node j; None = causal chains
    rows: torch.Tensor | None = None        # [N] ragged: each token's cache row ...
    nodes: torch.Tensor | None = None       # [N] ... and its node index in that row's tree


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lookahead.rms_norm(x.contiguous(), self.weight, self.eps)


class Embedding(nn.Embedding):
    """nn.Embedding without the random init when built on the meta device (its first use imports torch._dynamo,
    seconds of a model load)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Linear(nn.Linear):
    """nn.Linear through the registry's invariant linear (a row's bits never depend on the other rows; the weight is
    read in place: no packed copy)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # built on meta by from_pretrained: the checkpoint fills it, skip the init
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lookahead.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.interleaved = cfg.rope_interleaved
        self.wqkv = Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        k_cache, v_cache = ctx.cache.buffer[self.layer]  # (R, Hkv, S, D) each
        q = torch.ops.lookahead.rope_store(self.wqkv(x), ctx.cos, ctx.sin, k_cache, v_cache, ctx.slots, self.n_heads,
                                           self.interleaved, ctx.rows)  # (B, T, Hq, D); K/V stored at the slots
        if ctx.mode == "verify":
            y = torch.ops.lookahead.tree_attention(q if ctx.rows is None else q[0], k_cache, v_cache, ctx.lens,
                                                   ctx.tree_mask, self.head_dim ** -0.5, ctx.rows, ctx.nodes)
        else:  # prefill: causal attention over the slots just written
            y = torch.ops.lookahead.causal_attention(q, k_cache[:, :, :T].transpose(1, 2),
                                                     v_cache[:, :, :T].transpose(1, 2))
        return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU with gate and up fused into one matmul (w13 = [gate; up])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = Linear(cfg.dim, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w2 = Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.ops.lookahead.silu_mul(self.w13(x)))


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
        """x [B, T, dim] is this forward's own residual stream: updated in place, then returned."""
        h = self.attention(self.attention_norm(x), ctx)
        h = self.post_attention_norm(h) if self.sandwich else h
        # the residual add and the norm in one pass: x += h
        h = self.feed_forward(torch.ops.lookahead.add_rms_norm_(x, h.contiguous(), self.ffn_norm.weight,
                                                                self.ffn_norm.eps))
        return x.add_(self.post_ffn_norm(h) if self.sandwich else h)

    def weights(self) -> dict[str, torch.Tensor | None]:
        """This layer's tensors by the names of kernels.ops.LAYER_WEIGHTS (None: absent). wk, wv and w3 are the
        other parts of a q/k/v or gate/up projection whose GGUF types differ (models/gguf.py's SplitLinear)."""
        a, f = self.attention, self.feed_forward
        wk, wv = (list(getattr(a.wqkv, "rest", ())) + [None, None])[:2]
        w3 = (list(getattr(f.w13, "rest", ())) + [None])[0]
        return {"wk": wk, "wv": wv, "w3": w3, "attention_norm": self.attention_norm.weight, "wqkv": a.wqkv.weight, "wqkv_bias": a.wqkv.bias,
                "wo": a.wo.weight, "wo_bias": a.wo.bias, "ffn_norm": self.ffn_norm.weight, "w13": f.w13.weight,
                "w13_bias": f.w13.bias, "w2": f.w2.weight, "w2_bias": f.w2.bias,
                "post_attention_norm": self.post_attention_norm.weight if self.sandwich else None,
                "post_ffn_norm": self.post_ffn_norm.weight if self.sandwich else None}
