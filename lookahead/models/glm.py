"""The GLM family: glm (GLM-4-9B-chat-hf: partial, interleaved RoPE; qkv bias; fused gate/up) and glm4
(GLM-4-0414: the same plus norms after attention and after the MLP)."""

from __future__ import annotations

import torch

from lookahead.models.causal_lm import CausalLM
from lookahead.models.config import ModelConfig
from lookahead.models.loading import Pretrained, decoder_config, fuse_llama_style, rope_parameters


class GlmForLookahead(Pretrained, CausalLM):
    model_types = ("glm", "glm4")

    @classmethod
    def family_config(cls, hf: dict) -> ModelConfig:
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        partial = rope_parameters(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        return decoder_config(
            hf, norm_eps=1e-5, max_positions=131072,
            rotary_dim=int(head_dim * partial),  # as transformers; an odd value rotates one extra dim
            rope_interleaved=True,
            qkv_bias=bool(hf.get("attention_bias", True)),
            sandwich_norms=hf["model_type"] == "glm4",
        )

    @classmethod
    def convert_state_dict(cls, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        out = fuse_llama_style(sd, cfg)
        if cfg.sandwich_norms:
            for i in range(cfg.n_layers):
                out[f"layers.{i}.post_attention_norm.weight"] = sd[f"model.layers.{i}.post_self_attn_layernorm.weight"]
                out[f"layers.{i}.post_ffn_norm.weight"] = sd[f"model.layers.{i}.post_mlp_layernorm.weight"]
        return out
