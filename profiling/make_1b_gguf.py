"""A 1B Llama-shaped checkpoint with random weights as llama.cpp's own tools make GGUF files of it (docs/gguf.md):
HF dir (hidden 2048, 16 layers, 32 query / 8 KV heads of 64, intermediate 8192, SmolLM2's 49,152-token vocabulary
and tokenizer, tied embeddings: 1.07B parameters, bf16 safetensors) -> convert_hf_to_gguf.py (from the
llama-cpp-python 0.3.36 sdist, `make llamacpp-venv`) to a bf16 GGUF -> llama_cpp.llama_model_quantize to the
types asked for.

    python profiling/make_1b_gguf.py --out /tmp/1b --types Q4_K_M Q8_0 Q4_1

Run it with the main venv's python (torch, transformers); the quantizer runs in .venv-llamacpp.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lookahead.benchmarks.llamacpp_bench import run_job
from lookahead.benchmarks.llamacpp_runner import FTYPES

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_PY = ROOT / ".venv-llamacpp" / "bin" / "python"
SDIST = ROOT / ".venv-llamacpp" / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
CONVERT_DEPS = ROOT / ".venv-llamacpp" / "convert-deps"  # sentencepiece, which the converter imports

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, num_hidden_layers=16,
              num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=49152,
              tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
              hidden_act="silu", bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")


def make_hf(out: Path, seed: int = 0) -> None:
    """config.json, model.safetensors (random bf16, std 0.02; norms 1) and SmolLM2's tokenizer files."""
    import torch
    from safetensors.torch import save_file

    from lookahead.models.checkpoint import resolve_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    smol = resolve_checkpoint("smollm2-135m-instruct")  # the converted embedded model: its tokenizer files
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol / name, out / name)
    c, g = CONFIG, torch.Generator().manual_seed(seed)
    D, I, H, KV, hd = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"], 64

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": rnd(c["vocab_size"], D), "model.norm.weight": torch.ones(D, dtype=torch.bfloat16)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": rnd(H * hd, D), p + "self_attn.k_proj.weight": rnd(KV * hd, D),
                   p + "self_attn.v_proj.weight": rnd(KV * hd, D), p + "self_attn.o_proj.weight": rnd(D, H * hd),
                   p + "mlp.gate_proj.weight": rnd(I, D), p + "mlp.up_proj.weight": rnd(I, D),
                   p + "mlp.down_proj.weight": rnd(D, I),
                   p + "input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16)})
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})


def convert(hf: Path, gguf: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SDIST / "gguf-py"), str(CONVERT_DEPS)])}
    subprocess.run([sys.executable, str(SDIST / "convert_hf_to_gguf.py"), str(hf), "--outfile", str(gguf),
                    "--outtype", "bf16"], check=True, env=env)


def quantize(src: Path, dst: Path, kind: str) -> None:
    run_job(LLAMACPP_PY, {"system": "llamacpp", "task": "quantize", "gguf": str(src), "dst": str(dst), "type": kind,
                          "threads": 2})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--types", nargs="+", default=["Q4_K_M"], choices=sorted(FTYPES))
    args = ap.parse_args()
    hf, bf16 = args.out / "hf", args.out / "1b-bf16.gguf"
    if not (hf / "model.safetensors").is_file():
        make_hf(hf)
    if not bf16.is_file():
        convert(hf, bf16)
    for kind in args.types:
        dst = args.out / f"1b-{kind}.gguf"
        if not dst.is_file():
            quantize(bf16, dst, kind)
        print(dst, f"{dst.stat().st_size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
