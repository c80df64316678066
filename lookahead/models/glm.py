"""The GLM family: glm (GLM-4-9B-chat-hf: partial, interleaved RoPE; qkv bias; fused gate/up) and glm4
(GLM-4-0414: the same plus norms after attention and after the MLP)."""

from __future__ import annotations

import torch

from lookahead.models.base import CausalLM, ModelConfig, eos_ids, fuse_llama_style, rope_parameters


class GlmForLookahead(CausalLM):
    model_types = ("glm", "glm4")

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        rope = rope_parameters(hf)
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        return ModelConfig(
            model_type=hf["model_type"],
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            max_position_embeddings=hf.get("max_position_embeddings", 131072),
            rope_theta=rope["rope_theta"],
            rope_type=rope["rope_type"],
            rope_params=rope,
            rotary_dim=int(head_dim * partial),  # as transformers; an odd value rotates one extra dim
            rope_interleaved=True,
            qkv_bias=bool(hf.get("attention_bias", True)),
            sandwich_norms=hf["model_type"] == "glm4",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            eos_token_id=eos_ids(hf.get("eos_token_id")),
        )

    @classmethod
    def convert_state_dict(cls, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        out = fuse_llama_style(sd, cfg)
        if cfg.sandwich_norms:
            for i in range(cfg.n_layers):
                out[f"layers.{i}.post_attention_norm.weight"] = sd[f"model.layers.{i}.post_self_attn_layernorm.weight"]
                out[f"layers.{i}.post_ffn_norm.weight"] = sd[f"model.layers.{i}.post_mlp_layernorm.weight"]
        return out
