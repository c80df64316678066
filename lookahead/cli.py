"""Command line: `lookahead generate`, `chat`, `demo`, `bench`, `replay`, `serve`, `bench-serve`, `bench-vllm` and
`bench-llamacpp`."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

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
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")  # meaningful only with --do-sample
# Subcommands whose module is imported only when chosen: `lookahead --help` and the others work without it.
LAZY_SUBCOMMANDS = {
    "bench": ("lookahead.benchmarks.bench", "benchmark against transformers on Spec-Bench, HumanEval or a JSONL"),
    "replay": ("lookahead.benchmarks.replay", "judge drafters on recorded greedy outputs, without the model"),
    "serve": ("lookahead.serve.app", "OpenAI-compatible HTTP server with iteration-level batching"),
    "bench-serve": ("lookahead.benchmarks.serve_bench", "load-test `lookahead serve`: lookahead on vs off at several concurrencies"),
    "bench-vllm": ("lookahead.benchmarks.vllm_bench", "vLLM plain / ngram / suffix / our proposer on Spec-Bench"),
    "bench-llamacpp": ("lookahead.benchmarks.llamacpp_bench", "ours vs llama.cpp on GGUF files: Spec-Bench, decode, logits"),
}


def sampling_kwargs(args) -> dict:
    """The sampling arguments of generate that were given; ValueError for one given without --do-sample."""
    given = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    if given and not args.do_sample:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags} only apply with --do-sample (greedy decoding ignores them)")
    return {"do_sample": True, **given} if args.do_sample else {}


def summary(stats) -> str:
    return (f"[{stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tokens/s, {stats.accepted_per_step:.2f} "
            f"accepted/step, prefill {stats.prefill_s:.2f}s]")


def calibrate_untimed(model, args) -> None:
    """Load the cached verify cost curve, or measure the quick prior (9 forward passes) the learned step costs start from,
    so that the first call's summary does not include it."""
    if not args.no_lookahead:
        from lookahead.engine.pricing import prior_curve

        prior_curve(model)


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    from lookahead.data import encode_prompt
    from lookahead.models.auto import load_model

    sampling = sampling_kwargs(args)
    refs = [Path(f).read_text() for f in args.reference] if args.reference else None
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    calibrate_untimed(model, args)
    ids = encode_prompt(tokenizer, args.prompt, args.chat).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, lookahead=not args.no_lookahead,
                         references=refs, tokenizer=tokenizer, stop_strings=args.stop, streamer=streamer,
                         return_dict_in_generate=True, **sampling)
    print(summary(out.stats), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """A multi-turn chat on stdin/stdout: the chat template over the whole history each turn, the reply
    streamed, a summary per turn on stderr. The trie stays on the model, so later turns draft from earlier
    ones. /reset clears the history; /exit, /quit or end of input ends."""
    from transformers import TextStreamer

    from lookahead.data import encode_chat
    from lookahead.models.auto import load_model

    sampling = sampling_kwargs(args)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    calibrate_untimed(model, args)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    prompt = ""
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())

        prompt = "> "
    history: list[dict[str, str]] = []
    replies = 0
    while True:
        try:
            text = input(prompt).strip()
        except EOFError:
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("[history cleared]", file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = encode_chat(tokenizer, history).to(model.device)
        try:
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, lookahead=not args.no_lookahead,
                                 streamer=streamer, return_dict_in_generate=True, **sampling)
        except ValueError as e:
            history.pop()
            if not replies:  # bad settings fail on the first turn: exit 2 like the other commands
                raise
            print(f"lookahead: error: {e} (/reset clears the history)", file=sys.stderr)
            continue
        replies += 1
        reply = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply.strip()})
        print(summary(out.stats), file=sys.stderr, flush=True)
    return 0


def cmd_demo(args) -> int:
    import torch

    from lookahead.engine.pricing import calibrate
    from lookahead.data import encode_prompt
    from lookahead.models.auto import load_model

    from lookahead.kernels import cpu as cpu_ops
    from lookahead.models.gguf import describe as describe_weights

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s ({torch.get_num_threads()} threads, "
          f"{model.device}, {model.dtype})")
    print(describe_weights(model))
    if model.device.type == "cpu":
        auto, why = cpu_ops.auto_dtype()
        print(f"CPU: {cpu_ops.cpu_name()}; dtype auto is {str(auto).removeprefix('torch.')}: {why}; the C++ CPU ops "
              f"are {'on: decoding is bitwise lossless in every dtype' if cpu_ops.available() else 'off (no compiler)'}")
    # Measure (or load) the verify cost curve and run once untimed, so that no timed row pays for either.
    t0 = time.perf_counter()
    curve = calibrate(model)
    model.generate(encode_prompt(tokenizer, "Hello!", chat=True).to(model.device), max_new_tokens=8)
    model.trie.clear()  # the warm-up's text must not feed the measured rows' drafts
    shown = [T for T in sorted(curve) if T & (T - 1) == 0]  # powers of two
    print(f"calibrated and warmed up in {time.perf_counter() - t0:.1f}s; verify step by tree size: "
          + ", ".join(f"T={T} {1e3 * curve[T]:.0f} ms" for T in shown) + "\n")
    rows = []
    for name, prompt in DEMO_PROMPTS:
        ids = encode_prompt(tokenizer, prompt, chat=True).to(model.device)
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


def run_lazy(command: str, argv: list[str]) -> int:
    """Import the subcommand's module, parse its arguments with its own add_arguments, run it."""
    module_name, description = LAZY_SUBCOMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"lookahead {command}", description=description)
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    from lookahead.models.auto import DTYPE_HELP, DTYPES

    parser = argparse.ArgumentParser(prog="lookahead", description="Lossless lookahead decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p, required=True):
        p.add_argument("--model", required=required, default=None if required else "smollm2-135m-instruct",
                       help="HF checkpoint dir, .gguf file, or smollm2-135m-instruct")
        p.add_argument("--dtype", choices=list(DTYPES), default="auto", help=DTYPE_HELP)
        p.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    def decoding_args(p, max_new_tokens: int):
        p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
        p.add_argument("--no-lookahead", action="store_true", help="plain one-token decoding")
        p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument("--temperature", type=float, help="with --do-sample; > 0 (default 1.0)")
        p.add_argument("--top-k", type=int, help="with --do-sample: keep the k likeliest tokens (default 0 = off)")
        p.add_argument("--top-p", type=float, help="with --do-sample: nucleus mass in (0, 1] (default 1 = off)")
        p.add_argument("--seed", type=int, help="with --do-sample: same seed, same text, lookahead on or off")

    g = sub.add_parser("generate", help="stream a completion to stdout")
    model_args(g)
    g.add_argument("--prompt", required=True)
    decoding_args(g, 256)
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--reference", action="append", help="a text file to draft from (LLMA mode); repeatable")
    g.add_argument("--stop", action="append", metavar="STR", help="stop after this text; repeatable")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="multi-turn chat on stdin/stdout (/reset clears the history, /exit ends)")
    model_args(c)
    decoding_args(c, 256)
    c.set_defaults(func=cmd_chat)

    d = sub.add_parser("demo", help="plain vs lookahead on built-in prompts")
    model_args(d, required=False)
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.set_defaults(func=cmd_demo)

    for command, (_, description) in LAZY_SUBCOMMANDS.items():
        sub.add_parser(command, add_help=False, help=description + f" (see lookahead {command} --help)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in LAZY_SUBCOMMANDS and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return run_lazy(args.command, rest) if args.command in LAZY_SUBCOMMANDS else args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lookahead: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
