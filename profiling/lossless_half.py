"""Lossless in half precision on this CPU, at the step issue's scale: for each dtype, greedy lookahead == greedy plain
token for token on N Spec-Bench first turns (round-robin over the 13 categories) x 64 new tokens, warm drafting
memory (earlier prompts' outputs), every other prompt with a reference document in LLMA style (the next prompt's
text, so the reference is unrelated half the time and the drafter must not be fooled by it). The engine's drafting
gate is held open (as in the tests): it is a timing decision, and this check is about the bits of verify steps.

    python profiling/lossless_half.py --per-category 12 --dtypes bf16 fp16 --out bench/cpu/lossless_half.json
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-category", type=int, default=12)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from transformers import AutoTokenizer

    from lookahead.data import encode_prompt, spec_bench_first_turns
    from lookahead.engine.engine import Engine
    from lookahead.kernels.cpu import cpu_name
    from lookahead.models import LlamaForLookahead, resolve_checkpoint

    Engine._gate_open = lambda self, rows, prefilling: True

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"))
    prompts = spec_bench_first_turns(args.per_category)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    report = {"date": str(date.today()), "cpu": cpu_name(), "threads": args.threads, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "results": {}}
    for name in args.dtypes:
        model = LlamaForLookahead.from_pretrained("smollm2-135m-instruct", dtype=dtypes[name], device="cpu")
        start, same, accepted, differ = time.perf_counter(), 0, [], []
        for k, (category, text) in enumerate(prompts):
            ids = encode_prompt(tokenizer, text, chat=True)
            plain = model.generate(ids, max_new_tokens=args.max_new_tokens, lookahead=False)
            refs = [prompts[(k + 1) % len(prompts)][1]] if k % 2 else None
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, references=refs, tokenizer=tokenizer,
                                 return_dict_in_generate=True)
            if out.sequences.tolist() == plain.tolist():
                same += 1
            else:
                differ.append({"index": k, "category": category})
            accepted.append(out.stats.accepted_per_step)
        report["results"][name] = {"identical": same, "prompts": len(prompts), "differ": differ,
                                   "mean_accepted_per_step": sum(accepted) / len(accepted),
                                   "seconds": time.perf_counter() - start}
        print(f"{name}: {same}/{len(prompts)} identical to plain, {sum(accepted) / len(accepted):.2f} tokens/step, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
