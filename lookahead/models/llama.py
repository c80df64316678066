"""The Llama family: llama (Llama 2/3, SmolLM2; linear and llama3 RoPE scaling), mistral, qwen2 (qkv bias)."""

from __future__ import annotations

import torch

from lookahead.models.base import CausalLM, ModelConfig, eos_ids, fuse_llama_style, rope_parameters


class LlamaForLookahead(CausalLM):
    model_types = ("llama", "mistral", "qwen2")

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        rope = rope_parameters(hf)
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        use_window = hf.get("use_sliding_window", hf["model_type"] == "mistral")
        return ModelConfig(
            model_type=hf["model_type"],
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=rope["rope_theta"],
            rope_type=rope["rope_type"],
            rope_params=rope,
            qkv_bias=hf["model_type"] == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=hf["model_type"] != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=hf.get("sliding_window") if use_window else None,
            eos_token_id=eos_ids(hf.get("eos_token_id")),
        )

    @classmethod
    def convert_state_dict(cls, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return fuse_llama_style(sd, cfg)
