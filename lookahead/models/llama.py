"""The Llama family: llama (Llama 2/3, SmolLM2; linear and llama3 RoPE scaling), mistral, qwen2 (qkv bias)."""

from __future__ import annotations

import torch

from lookahead.models.causal_lm import CausalLM
from lookahead.models.config import ModelConfig
from lookahead.models.loading import Pretrained, decoder_config, fuse_llama_style


class LlamaForLookahead(Pretrained, CausalLM):
    model_types = ("llama", "mistral", "qwen2")

    @classmethod
    def family_config(cls, hf: dict) -> ModelConfig:
        use_window = hf.get("use_sliding_window", hf["model_type"] == "mistral")
        return decoder_config(
            hf, norm_eps=1e-6, max_positions=4096,
            qkv_bias=hf["model_type"] == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=hf["model_type"] != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=hf.get("sliding_window") if use_window else None,
        )

    @classmethod
    def convert_state_dict(cls, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return fuse_llama_style(sd, cfg)
