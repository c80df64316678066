"""Decode speed of the embedded SmolLM2 run on its quantized blocks against our bf16 one (dequantized), plain and
lookahead, in one process (docs/gguf.md). Ours against llama.cpp on the same file is `lookahead bench-llamacpp`.

    python profiling/gguf_decode.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time


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
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    smollm2(ap.parse_args())


if __name__ == "__main__":
    main()
