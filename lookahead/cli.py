"""Command line: `lookahead generate`, `lookahead demo`, `lookahead bench`."""

from __future__ import annotations

import argparse
import sys
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

DEMO_PROMPTS = [
    ("rewrite code", "Add type hints and a docstring to this function, and return the whole function:\n\n"
     "def moving_average(values, window):\n    result = []\n    for i in range(len(values) - window + 1):\n"
     "        chunk = values[i:i + window]\n        result.append(sum(chunk) / window)\n    return result\n"),
    ("summarize", "Summarize this passage in three sentences:\n\nThe Great Barrier Reef is the world's largest "
     "coral reef system, composed of over 2,900 individual reefs and 900 islands stretching for over 2,300 "
     "kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia. It can be seen "
     "from outer space and is the world's biggest single structure made by living organisms. The reef is "
     "threatened by climate change, which causes mass coral bleaching, and by pollution and overfishing."),
    ("explain", "Explain what a hash table is to a new programmer."),
]


def _load(args):
    import torch
    from transformers import AutoTokenizer

    from lookahead.models import resolve_checkpoint
    from lookahead.models.auto import model_class

    path = resolve_checkpoint(args.model)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    model = model_class(path).from_pretrained(path, dtype=dtype, device=args.device)
    return model, AutoTokenizer.from_pretrained(path)


def encode_prompt(tokenizer, text: str, chat: bool):
    """Token ids [1, T] of a prompt, through the chat template (user turn, generation prompt) when chat."""
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(text, return_tensors="pt").input_ids


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    model, tokenizer = _load(args)
    ids = encode_prompt(tokenizer, args.prompt, args.chat).to(model.tok_embeddings.weight.device)
    refs = [open(f).read() for f in args.reference] if args.reference else None
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, lookahead=not args.no_lookahead,
                         references=refs, tokenizer=tokenizer, streamer=streamer, return_dict_in_generate=True)
    s = out.stats
    print(f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tokens/s, {s.accepted_per_step:.2f} accepted/step, "
          f"prefill {s.prefill_s:.2f}s]", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    import torch

    args.model = args.model or "smollm2-135m-instruct"
    t0 = time.perf_counter()
    model, tokenizer = _load(args)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s ({torch.get_num_threads()} threads, "
          f"{model.tok_embeddings.weight.device}, {model.tok_embeddings.weight.dtype})\n")
    rows = []
    for name, prompt in DEMO_PROMPTS:
        ids = encode_prompt(tokenizer, prompt, chat=True).to(model.tok_embeddings.weight.device)
        plain = model.generate(ids, max_new_tokens=args.max_new_tokens, lookahead=False, return_dict_in_generate=True)
        la = model.generate(ids, max_new_tokens=args.max_new_tokens, references=[prompt], tokenizer=tokenizer,
                            return_dict_in_generate=True)
        text = tokenizer.decode(la.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"### {name}\n{text.strip()}\n")
        same = la.sequences.tolist() == plain.sequences.tolist()
        rows.append((name, plain.stats.tokens_per_s, la.stats.tokens_per_s, la.stats.accepted_per_step,
                     la.stats.tokens_per_s / plain.stats.tokens_per_s, same))
    print(f"{'prompt':14s} {'plain tok/s':>11s} {'lookahead tok/s':>15s} {'accepted/step':>13s} {'speedup':>8s} "
          f"identical")
    for name, p, l, acc, speed, same in rows:
        print(f"{name:14s} {p:11.1f} {l:15.1f} {acc:13.2f} {speed:7.2f}x {'yes' if same else 'NO'}")
    return 0 if all(r[-1] for r in rows) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lookahead", description="Lossless lookahead decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p, required=True):
        p.add_argument("--model", required=required, help="HF checkpoint dir, .gguf file, or smollm2-135m-instruct")
        p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
        p.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    g = sub.add_parser("generate", help="stream a completion to stdout")
    model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--no-lookahead", action="store_true", help="plain one-token decoding")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--reference", action="append", help="a text file to draft from (LLMA mode); repeatable")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="plain vs lookahead on built-in prompts")
    model_args(d, required=False)
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmark against transformers on Spec-Bench, HumanEval or a JSONL")
    from lookahead.bench import add_arguments, run
    add_arguments(b)
    b.set_defaults(func=run)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lookahead: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
