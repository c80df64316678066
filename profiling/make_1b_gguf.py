"""A 1B Llama-shaped checkpoint with random weights as llama.cpp's own tools make GGUF files of it (docs/gguf.md):
HF dir (hidden 2048, 16 layers, 32 query / 8 KV heads of 64, intermediate 8192, SmolLM2's 49,152-token vocabulary
and tokenizer, tied embeddings: 1.07B parameters, bf16 safetensors) -> convert_hf_to_gguf.py (from the
llama-cpp-python 0.3.36 sdist, `make llamacpp-venv`) to a bf16 GGUF -> llama_cpp.llama_model_quantize to the
types asked for. `--shape 8b`: Llama-3-8B's layers (hidden 4096, 32 layers, 32 query / 8 KV heads of 128,
intermediate 14336) with SmolLM2's vocabulary and an untied LM head: 7.4B parameters (15 GB in bf16, written
one layer a shard so that memory stays at a layer's size).

    python profiling/make_1b_gguf.py --out /tmp/1b --types Q4_K_M Q8_0 Q4_1
    python profiling/make_1b_gguf.py --shape 8b --out /tmp/8b --types Q4_K_M --drop-intermediate

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
SHAPES = {"1b": CONFIG,
          "8b": {**CONFIG, "hidden_size": 4096, "num_hidden_layers": 32, "head_dim": 128, "intermediate_size": 14336,
                 "tie_word_embeddings": False, "rope_theta": 500000.0}}


def make_hf(out: Path, config: dict = CONFIG, seed: int = 0) -> None:
    """config.json, the weights (random bf16, std 0.02; norms 1) as one safetensors shard per layer (the embeddings
    and final norm in the first, an untied LM head in the last) with their index, and SmolLM2's tokenizer files."""
    import torch
    from safetensors.torch import save_file

    from lookahead.models.checkpoint import resolve_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    smol = resolve_checkpoint("smollm2-135m-instruct")  # the converted embedded model: its tokenizer files
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol / name, out / name)
    c, g = config, torch.Generator().manual_seed(seed)
    D, I, H, KV, hd = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"],
                       c["head_dim"])

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    index: dict[str, str] = {}  # tensor -> its shard

    def write(tensors: dict) -> None:
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(tensors, out / name, metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, name))

    first = {"model.embed_tokens.weight": rnd(c["vocab_size"], D),
             "model.norm.weight": torch.ones(D, dtype=torch.bfloat16)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = {p + "self_attn.q_proj.weight": rnd(H * hd, D), p + "self_attn.k_proj.weight": rnd(KV * hd, D),
                 p + "self_attn.v_proj.weight": rnd(KV * hd, D), p + "self_attn.o_proj.weight": rnd(D, H * hd),
                 p + "mlp.gate_proj.weight": rnd(I, D), p + "mlp.up_proj.weight": rnd(I, D),
                 p + "mlp.down_proj.weight": rnd(D, I),
                 p + "input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16)}
        write({**first, **layer} if i == 0 else layer)
    if not c["tie_word_embeddings"]:
        write({"lm_head.weight": rnd(c["vocab_size"], D)})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))


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
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--types", nargs="+", default=["Q4_K_M"], choices=sorted(FTYPES))
    ap.add_argument("--drop-intermediate", action="store_true",
                    help="delete the HF dir and the bf16 GGUF once the types are made (the 8B's take 30 GB)")
    args = ap.parse_args()
    hf, bf16 = args.out / "hf", args.out / f"{args.shape}-bf16.gguf"
    made = [args.out / f"{args.shape}-{kind}.gguf" for kind in args.types]
    if not all(dst.is_file() for dst in made):
        if not bf16.is_file():
            if not (hf / "model.safetensors.index.json").is_file():
                make_hf(hf, SHAPES[args.shape])
            convert(hf, bf16)
        for kind, dst in zip(args.types, made):
            if not dst.is_file():
                quantize(bf16, dst, kind)
    for dst in made:
        print(dst, f"{dst.stat().st_size / 1e6:.0f} MB")
    if args.drop_intermediate:
        shutil.rmtree(hf, ignore_errors=True)
        bf16.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
