"""This checkout against an older commit, in one process: the old package is exported from git as `lookahead_old`
(its C++ ops registered as `torch.ops.lookahead_old*`, so both sets load side by side) and both decode the same
Spec-Bench prompts in each dtype, interleaved prompt by prompt (old plain, new plain, old lookahead, new
lookahead), each lookahead with its own warm drafting memory. Prints tokens/s per system, new / old per system,
and whether every output is identical to the old system's.

    python profiling/before_after.py --old 7f75892 --dtypes bf16 fp32 --threads 2
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def export_old(commit: str, into: Path) -> None:
    """`git archive` of the commit's lookahead/ package, renamed lookahead_old (imports rewritten)."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "lookahead"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar.stdout, check=True)
    (into / "lookahead").rename(into / "lookahead_old")
    for path in (into / "lookahead_old").rglob("*.py"):
        text = re.sub(r"\b(from|import) lookahead\b", r"\1 lookahead_old", path.read_text())  # not `lookahead.x`
        # every reference to the ops' namespaces, `torch.ops.lookahead_cpu.x` and `getattr(torch.ops.lookahead_cpu,
        # name)` alike (a missed one would run the new ops under the old name), and the Python library's own name
        text = re.sub(r"torch\.ops\.lookahead(_cpu)?\b", r"torch.ops.lookahead_old\1", text)
        text = text.replace('Library("lookahead", "DEF")', 'Library("lookahead_old", "DEF")')
        path.write_text(text.replace('LIBRARY = "lookahead_cpu"', 'LIBRARY = "lookahead_old_cpu"'))
    for path in (into / "lookahead_old").rglob("*.cpp"):  # the old ops under their own namespace
        path.write_text(re.sub(r"TORCH_LIBRARY(_FRAGMENT|_IMPL)\(lookahead(_cpu)?,", r"TORCH_LIBRARY\1(lookahead_old\2,",
                               path.read_text()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the commit to compare against")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16", "fp16", "gguf"],
                   help="dtypes both run in; gguf: the shipped file's native quantized blocks (docs/gguf.md)")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--last", action="store_true", help="the last per-category prompts of Spec-Bench, not the first")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--new-first", action="store_true",
                   help="load (and place in memory) the new version's models first: a process's memory placement "
                        "alone moves decode speed by several percent")
    p.add_argument("--own-curves", action="store_true",
                   help="each version drafts by its own cached or measured verify cost curve (default: the one loaded "
                        "second takes the first one's, measured or cached for this dtype, so both price drafts "
                        "alike)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lookahead_old_"))
    export_old(args.old, tmp)
    sys.path.insert(0, str(tmp))
    packages = {"old": importlib.import_module("lookahead_old"), "new": importlib.import_module("lookahead")}
    from lookahead.data import encode_prompt, spec_bench_first_turns
    from lookahead.kernels.cpu import cpu_name
    from lookahead.models.auto import DTYPES
    from transformers import AutoTokenizer

    models, curves = {}, {}
    order = ("new", "old") if args.new_first else ("old", "new")
    for name, dtype in [(n, d) for d in args.dtypes for n in order]:
        pkg = packages[name]
        family = importlib.import_module(pkg.__name__ + ".models").LlamaForLookahead
        kwargs = {} if dtype == "gguf" else {"dtype": DTYPES[dtype]}  # gguf: the default, quantized
        models[name, dtype] = model = family.from_pretrained("smollm2-135m-instruct", device="cpu", **kwargs)
        cost = importlib.import_module(pkg.__name__ + ".cost")
        if dtype in curves and not args.own_curves:  # the first one's curve: the same prices, only the code differs
            model.state.cost_curves[cost.curve_key(model)] = dict(curves[dtype])
        curves[dtype] = cost.calibrate(model)
    tokenizer = AutoTokenizer.from_pretrained(packages["new"].models.resolve_checkpoint("smollm2-135m-instruct"))
    turns = spec_bench_first_turns(None if args.last else args.per_category)
    if args.last:  # the last per_category prompts of each category
        by_cat = {}
        for cat, text in turns:
            by_cat.setdefault(cat, []).append(text)
        turns = [(c, t) for c, texts in by_cat.items() for t in texts[-args.per_category:]]
    prompts = [encode_prompt(tokenizer, text, True) for _, text in turns]
    systems = [(key, lookahead) for key in models for lookahead in (False, True)]
    for model in models.values():  # untimed warm-up of each
        model.generate(prompts[0], max_new_tokens=8, lookahead=True)
        model.state.forget_drafting()
    tokens = {s: 0 for s in systems}
    wall = {s: 0.0 for s in systems}
    cpu = {s: 0.0 for s in systems}  # process CPU time: with one thread, the time this process really ran
    decode = {s: 0.0 for s in systems}
    outputs = {s: [] for s in systems}
    for ids in prompts:
        for key, lookahead in systems:
            t0, c0 = time.perf_counter(), time.process_time()
            out = models[key].generate(ids, max_new_tokens=args.max_new_tokens, lookahead=lookahead,
                                       return_dict_in_generate=True)
            wall[key, lookahead] += time.perf_counter() - t0
            cpu[key, lookahead] += time.process_time() - c0
            decode[key, lookahead] += out.stats.decode_s
            new = out.sequences[0, ids.shape[1]:].tolist()
            tokens[key, lookahead] += len(new)
            outputs[key, lookahead].append(new)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, {len(prompts)} Spec-Bench prompts x "
          f"{args.max_new_tokens} tokens, old = {args.old}, "
          f"{'own cost curves' if args.own_curves else 'one cost curve per dtype'}, "
          f"{'new' if args.new_first else 'old'} loaded first")
    for (name, dtype), lookahead in systems:
        plain = outputs[(name, dtype), False]
        same = sum(a == b for a, b in zip(outputs[(name, dtype), lookahead], plain))
        k = ((name, dtype), lookahead)
        print(f"{name} {dtype} {'lookahead' if lookahead else 'plain':9s}: {tokens[k] / wall[k]:6.2f} tok/s wall, "
              f"{tokens[k] / decode[k]:6.2f} decode-only, {tokens[k] / cpu[k]:6.2f} per CPU s ({tokens[k]} tokens, "
              f"{wall[k]:.1f} s; identical to its own plain {same}/{len(prompts)})")
    for (name, dtype), lookahead in systems:
        if name != "new":
            continue
        old, new = ((("old", dtype), lookahead)), ((("new", dtype), lookahead))
        same = sum(a == b for a, b in zip(outputs[new], outputs[old]))
        print(f"new / old {dtype} {'lookahead' if lookahead else 'plain':9s}: decode-only "
              f"{tokens[new] / decode[new] / (tokens[old] / decode[old]):.3f}x, wall "
              f"{tokens[new] / wall[new] / (tokens[old] / wall[old]):.3f}x, per CPU s "
              f"{tokens[new] / cpu[new] / (tokens[old] / cpu[old]):.3f}x; identical outputs {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
