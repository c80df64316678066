"""Decode speed of GGUF files run on their quantized blocks (docs/gguf.md): ours against llama.cpp on the same file,
thread for thread, and the quantized SmolLM2 against our bf16 one, plain and lookahead.

    python profiling/gguf_decode.py compare --gguf /tmp/1b/1b-Q4_K_M.gguf --threads 1 2 --rounds 3
    python profiling/gguf_decode.py smollm2 --threads 2 --rounds 3

`compare` runs every system in a process of its own (ours: this venv; llama.cpp: .venv-llamacpp, `make
llamacpp-venv`), rounds interleaved, and keeps each system's best: plain greedy decode, (time of 65 tokens - time
of 1) / 64, EOS never stops it. Ours also reports load time and peak RSS of its process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_PY = ROOT / ".venv-llamacpp" / "bin" / "python"
PROMPT = "The history of the printing press begins"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def ours(args) -> dict:
    import torch

    from lookahead.models.auto import load_model
    from lookahead.models.gguf import describe

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_model(args.gguf, None if args.quantization == "auto" else args.dtype,
                            quantization=None if args.quantization == "none" else "auto")
    load_s = time.perf_counter() - t0
    ids = tok(PROMPT, return_tensors="pt").input_ids

    def run(n: int) -> float:
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, lookahead=False, eos_token_id=[])
        return time.perf_counter() - t

    run(8)  # warm-up (the RoPE table, the first pages of the map)
    per_token = min((run(args.tokens) - run(1)) / (args.tokens - 1) for _ in range(args.repeats))
    return dict(system=f"ours ({describe(model)})", threads=args.threads, ms_per_token=per_token * 1e3,
                load_s=load_s, peak_rss_gb=peak_rss_gb())


def llamacpp(args) -> dict:
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(args.gguf), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=512,
                verbose=False)
    load_s = time.perf_counter() - t0
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False)
    eos = llm.token_eos()

    def run(n: int) -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        for _ in range(n):
            logits = np.array(llm.scores[llm.n_tokens - 1])
            logits[eos] = -np.inf
            llm.eval([int(logits.argmax())])
        return time.perf_counter() - t

    run(8)
    per_token = min((run(args.tokens) - run(1)) / (args.tokens - 1) for _ in range(args.repeats))
    return dict(system="llama.cpp (llama-cpp-python 0.3.36)", threads=args.threads, ms_per_token=per_token * 1e3,
                load_s=load_s, peak_rss_gb=peak_rss_gb())


def compare(args) -> None:
    from lookahead.kernels.cpu import cpu_name

    systems = [("ours", [sys.executable]), ("llamacpp", [str(LLAMACPP_PY)])] + (
        [("ours-dequantized", [sys.executable])] if args.dequantized else [])
    best: dict[tuple[str, int], dict] = {}
    for r in range(args.rounds):
        for threads in args.threads:
            for name, py in systems:
                mode = "llamacpp" if name == "llamacpp" else "ours"
                cmd = [*py, __file__, mode, "--gguf", str(args.gguf), "--threads", str(threads), "--tokens",
                       str(args.tokens), "--repeats", "1"]
                if name == "ours-dequantized":
                    cmd += ["--quantization", "none"]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    raise RuntimeError(out.stderr[-3000:])
                res = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"round {r} {name} {threads}t: {res['ms_per_token']:.1f} ms/token, load {res['load_s']:.1f} s, "
                      f"peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)
                key = (name, threads)
                if key not in best or res["ms_per_token"] < best[key]["ms_per_token"]:
                    best[key] = res
    print(f"\n{args.gguf.name} ({args.gguf.stat().st_size / 1e6:.0f} MB), {cpu_name()}, best of {args.rounds} "
          "interleaved rounds, machine shared with other jobs")
    for (name, threads), res in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {name} | {threads} | {res['ms_per_token']:.1f} | {res['load_s']:.1f} | {res['peak_rss_gb']:.2f} | "
              f"{res['system']} |")


def smollm2(args) -> None:
    """The embedded SmolLM2, quantized (its Q4_1 file as it is) and bf16 (dequantized), in one process, interleaved:
    plain and lookahead ms/token over a few prompts, and whether lookahead returned plain's tokens."""
    import torch

    from lookahead.data import encode_prompt
    from lookahead.kernels.cpu import cpu_name
    from lookahead.models.auto import load_model
    from lookahead.models.gguf import describe

    torch.set_num_threads(args.threads)
    models = {"quantized": load_model("smollm2-135m-instruct"),
              "bf16": load_model("smollm2-135m-instruct", "bf16")}
    prompts = ["Write a Python function that checks whether a string is a palindrome, with tests.",
               "List the planets of the solar system with one fact about each.",
               "Rewrite this sentence three times, each time more formally: the cat sat on the mat and slept."]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, (model, tok) in models.items():
            model.trie.clear()
            for lookahead in (False, True):
                total_t, total_n, same = 0.0, 0, True
                for p in prompts:
                    ids = encode_prompt(tok, p, True)
                    t = time.perf_counter()
                    out = model.generate(ids, max_new_tokens=args.tokens, lookahead=lookahead, eos_token_id=[])
                    total_t += time.perf_counter() - t
                    total_n += out.shape[1] - ids.shape[1]
                times.setdefault((name, "lookahead" if lookahead else "plain"), []).append(total_t / total_n * 1e3)
    print(f"SmolLM2-135M, {cpu_name()}, {args.threads} threads, {len(prompts)} chat prompts x {args.tokens} tokens, "
          f"best of {args.rounds} interleaved rounds (median in brackets), machine shared with other jobs")
    for name, (model, _) in models.items():
        print(f"{name}: {describe(model)}")
    for (name, mode), ts in times.items():
        print(f"| {name} | {mode} | {min(ts):.2f} ({statistics.median(ts):.2f}) ms/token |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("ours", "llamacpp", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--gguf", type=Path, required=True)
        p.add_argument("--threads", type=int, nargs="+" if name == "compare" else None, default=[2] if name ==
                       "compare" else 2)
        p.add_argument("--tokens", type=int, default=65)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument("--quantization", choices=["auto", "none"], default="auto")
        p.add_argument("--dtype", default="bf16")
        p.add_argument("--dequantized", action="store_true", help="compare: our dequantized bf16 model too")
    p = sub.add_parser("smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.cmd == "ours":
        print(json.dumps(ours(args)))
    elif args.cmd == "llamacpp":
        print(json.dumps(llamacpp(args)))
    elif args.cmd == "compare":
        compare(args)
    else:
        smollm2(args)


if __name__ == "__main__":
    main()
