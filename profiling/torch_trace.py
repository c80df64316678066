"""torch.profiler Chrome trace of lookahead generation; works on CPU and CUDA.

    python profiling/torch_trace.py [--model NAME] [--tokens 64] [--out trace.json]

Open the JSON in chrome://tracing or https://ui.perfetto.dev. Each decode step shows as record_function
ranges (draft, verify, accept, compact, commit) over the model's ops.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoTokenizer

from lookahead.data import encode_prompt
from lookahead.models import LlamaForLookahead, resolve_checkpoint


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", default="Explain how a hash map handles collisions, with an example in Python.")
    p.add_argument("--out", default="lookahead_trace.json")
    args = p.parse_args()
    model = LlamaForLookahead.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(args.model))
    ids = encode_prompt(tokenizer, args.prompt, chat=True).to(model.device)
    model.generate(ids, max_new_tokens=8)  # warm-up: allocations, cost curve
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        out = model.generate(ids, max_new_tokens=args.tokens, return_dict_in_generate=True)
    prof.export_chrome_trace(args.out)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"{out.stats.new_tokens} tokens, {out.stats.accepted_per_step:.2f} accepted/step; trace: {args.out}")


if __name__ == "__main__":
    main()
