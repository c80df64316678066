"""Pick the model class that serves a checkpoint's model_type, and load a model with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from lookahead.models.checkpoint import load_config, resolve_checkpoint
from lookahead.models.llama import LlamaForLookahead

# command-line dtype names; "auto": bf16 on a CPU that multiplies bf16 natively, else fp32; on CUDA the checkpoint's
DTYPES = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_HELP = ("default auto: bf16 on a CPU with native bf16 matmul (AVX512_BF16 or AMX) and the C++ CPU ops, fp32 on "
              "other CPUs, the checkpoint's half dtype on CUDA")


def model_classes() -> list[type]:
    import lookahead.models.glm as glm

    return [LlamaForLookahead, glm.GlmForLookahead]


def model_class(path: Path) -> type:
    """The class whose model_types include the checkpoint's config.json model_type."""
    model_type = load_config(path)["model_type"]
    classes = model_classes()
    for cls in classes:
        if model_type in cls.model_types:
            return cls
    served = sorted(t for cls in classes for t in cls.model_types)
    raise ValueError(f"model_type {model_type!r} is not served; supported: {', '.join(served)}")


def load_model(name_or_path: str | Path, dtype: str | None = None, device: str | torch.device | None = None,
               quantization: str | None = "auto"):
    """(model, tokenizer) of the embedded name, an HF checkpoint dir or a .gguf file. dtype: a DTYPES name
    (None = "auto"); device: None = cuda when available, else cpu; quantization: docs/gguf.md."""
    from transformers import AutoTokenizer

    import lookahead.models.gguf as gguf

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    native = gguf.native_gguf(name_or_path, DTYPES[dtype or "auto"], device, quantization)
    if native is not None:  # quantized blocks, no conversion: the tokenizer comes from the GGUF's metadata too
        model = LlamaForLookahead.from_pretrained(native, dtype=DTYPES[dtype or "auto"], device=device,
                                                  quantization="gguf")
        return model, gguf.tokenizer(native)
    path = resolve_checkpoint(name_or_path)
    model = model_class(path).from_pretrained(path, dtype=DTYPES[dtype or "auto"], device=device)
    return model, AutoTokenizer.from_pretrained(path)
