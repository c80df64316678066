"""This checkout against an older commit, in one process: the old package is exported from git as `lookahead_old`
and both decode the same Spec-Bench prompts, interleaved prompt by prompt (old plain, new plain, old lookahead,
new lookahead), each lookahead with its own warm drafting memory. Prints tokens/s per system and whether every
output is identical.

    python profiling/before_after.py --old f9945b7 --per-category 1 --max-new-tokens 128
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
        text = path.read_text()
        path.write_text(re.sub(r"\blookahead\.", "lookahead_old.", re.sub(r"\bfrom lookahead import\b",
                                                                          "from lookahead_old import", text)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the commit to compare against")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lookahead_old_"))
    export_old(args.old, tmp)
    sys.path.insert(0, str(tmp))
    packages = {"old": importlib.import_module("lookahead_old"), "new": importlib.import_module("lookahead")}
    from lookahead.data import encode_prompt, spec_bench_first_turns
    from transformers import AutoTokenizer

    models = {}
    for name, pkg in packages.items():
        models_mod = importlib.import_module(pkg.__name__ + ".models")
        models[name] = models_mod.LlamaForLookahead.from_pretrained("smollm2-135m-instruct", dtype=torch.float32,
                                                                    device="cpu")
        importlib.import_module(pkg.__name__ + ".cost").calibrate(models[name])
    tokenizer = AutoTokenizer.from_pretrained(packages["new"].models.resolve_checkpoint("smollm2-135m-instruct"))
    prompts = [encode_prompt(tokenizer, text, True) for _, text in spec_bench_first_turns(args.per_category)]
    systems = [("old", False), ("new", False), ("old", True), ("new", True)]
    for name, model in models.items():  # untimed warm-up of each
        model.generate(prompts[0], max_new_tokens=8, lookahead=True)
        model.state.forget_drafting()
    tokens = {s: 0 for s in systems}
    seconds = {s: 0.0 for s in systems}
    outputs = {s: [] for s in systems}
    for ids in prompts:
        for name, lookahead in systems:
            t0 = time.perf_counter()
            out = models[name].generate(ids, max_new_tokens=args.max_new_tokens, lookahead=lookahead)
            seconds[name, lookahead] += time.perf_counter() - t0
            new = out[0, ids.shape[1]:].tolist()
            tokens[name, lookahead] += len(new)
            outputs[name, lookahead].append(new)
    reference = outputs["old", False]
    for name, lookahead in systems:
        same = sum(a == b for a, b in zip(outputs[name, lookahead], reference))
        print(f"{name} {'lookahead' if lookahead else 'plain':9s}: {tokens[name, lookahead] / seconds[name, lookahead]:6.2f}"
              f" tok/s  ({tokens[name, lookahead]} tokens, {seconds[name, lookahead]:.1f} s; identical to old plain "
              f"{same}/{len(prompts)})")
    for lookahead in (False, True):
        ratio = (tokens["new", lookahead] / seconds["new", lookahead]) / (tokens["old", lookahead] / seconds["old", lookahead])
        print(f"new / old {'lookahead' if lookahead else 'plain'}: {ratio:.3f}x")


if __name__ == "__main__":
    main()
