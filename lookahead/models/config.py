"""A decoder's shape and variant (`ModelConfig`, filled from a config.json by the families) and its RoPE
frequencies."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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
