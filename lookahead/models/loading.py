"""From an HF checkpoint to a ready model: config.json -> ModelConfig, HF tensor names -> ours (q/k/v and
gate/up fused), the default dtype, and the meta-device load behind `Pretrained.from_pretrained`.

The families (llama.py, glm.py) build their hooks from `decoder_config` and `fuse_llama_style`; the modules
they fill live in base.py.
"""

from __future__ import annotations

import torch

from lookahead.kernels import cpu as cpu_ops
from lookahead.models.causal_lm import CausalLM
from lookahead.models.config import ModelConfig, rope_inv_freq
from lookahead.models.checkpoint import load_config, load_state_dict, resolve_checkpoint


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
    """config.json's eos_token_id (absent, one id or a list) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


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


def default_dtype(hf: dict, device: torch.device) -> torch.dtype:
    """dtype="auto": on CPU the faster exact dtype of the code path the C++ ops run (`cpu_ops.auto_dtype`: bf16 on
    AVX2, AVX-512 and AVX512_BF16), fp32 elsewhere; on CUDA the checkpoint's half dtype, bf16 when it is stored in
    fp32."""
    if device.type != "cuda":
        return cpu_ops.auto_dtype()[0]
    stored = hf.get("dtype") or hf.get("torch_dtype")
    return torch.float16 if stored == "float16" else torch.bfloat16


class Pretrained:
    """`from_pretrained` for the model families (`class LlamaForLookahead(Pretrained, CausalLM)`): loading builds
    on the modules of base.py, never the other way round."""

    @classmethod
    def from_pretrained(cls, name_or_path, dtype: torch.dtype | str | None = "auto", device=None,
                        quantization: str | None = "auto"):
        """Load an HF checkpoint dir, a .gguf file or the embedded "smollm2-135m-instruct" (docs/API.md); a GGUF
        runs its quantized blocks natively where it can (quantization=, docs/gguf.md)."""
        return load_pretrained(cls, name_or_path, dtype, device, quantization)


def load_pretrained(cls: type[CausalLM], name_or_path, dtype: torch.dtype | str | None, device,
                    quantization: str | None = "auto") -> CausalLM:
    """`cls.from_pretrained`: the model is built on the meta device (no random init), the checkpoint's tensors
    are assigned in place of its parameters, and one `.to(device, dtype)` moves it. dtype "auto" (or None):
    `default_dtype`. A GGUF that runs quantized (models/gguf.py's `native_gguf`) keeps its blocks instead."""
    import lookahead.models.gguf as gguf

    native = gguf.native_gguf(name_or_path, dtype, device, quantization)
    if native is not None:
        return gguf.load_quantized(cls, native, dtype)
    path = resolve_checkpoint(name_or_path)
    hf = load_config(path)
    cfg = cls.config_from_hf(hf)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None or dtype == "auto":
        dtype = default_dtype(hf, device)
    elif not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be \"auto\" or a floating torch dtype (torch.float32, torch.bfloat16, "
                         f"torch.float16), got {dtype!r}")
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
        model._weights_list = None  # the decode step's weight list (CausalLM._layer_weights) holds the old head
    missing = [n for n in result.missing_keys if not (cfg.tie_word_embeddings and n == "output.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not fit a {cfg.model_type} model: missing "
                         f"{missing[:4]}, unexpected {result.unexpected_keys[:4]}")
    model.inv_freq = rope_inv_freq(cfg)
    model.name_or_path = str(path)
    return model.to(device=device, dtype=dtype).eval()
