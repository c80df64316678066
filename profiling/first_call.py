"""A new user's first call: `generate(..., lookahead=True)` in a fresh process whose $LOOKAHEAD_CACHE holds the
converted checkpoint but no cost curve, against the same first call with lookahead=False in another fresh
process. Pairs alternate; the medians are compared (the target: lookahead's first call <= 1.2x plain's).

    python profiling/first_call.py --pairs 3 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from lookahead.data import encode_prompt, spec_bench_first_turns
from lookahead.models.auto import load_model
model, tok = load_model("smollm2-135m-instruct", "auto", "cpu")  # the default a new user gets
ids = encode_prompt(tok, spec_bench_first_turns(1)[int(sys.argv[2])][1], True)
t0 = time.perf_counter()
out = model.generate(ids, max_new_tokens=int(sys.argv[3]), lookahead=sys.argv[1] == "1", return_dict_in_generate=True)
print(json.dumps({"wall_s": time.perf_counter() - t0, "tokens": out.stats.new_tokens,
                  "accepted_per_step": out.stats.accepted_per_step, "sequence": out.sequences[0].tolist()}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--prompt", type=int, default=0, help="index into the Spec-Bench first turns (1 per category)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()
    from lookahead.models import resolve_checkpoint

    checkpoint = resolve_checkpoint("smollm2-135m-instruct")
    walls: dict[str, list[float]] = {"lookahead": [], "plain": []}
    same = True
    for _ in range(args.pairs):
        runs = {}
        for mode in ("lookahead", "plain"):
            with tempfile.TemporaryDirectory() as cache:  # the checkpoint, and no cost curve
                (Path(cache) / checkpoint.name).symlink_to(checkpoint)
                env = {**os.environ, "LOOKAHEAD_CACHE": cache}
                out = subprocess.run([sys.executable, "-c", CHILD, "1" if mode == "lookahead" else "0",
                                      str(args.prompt), str(args.max_new_tokens)], env=env, check=True,
                                     capture_output=True, text=True)
                runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
                walls[mode].append(runs[mode]["wall_s"])
        same &= runs["lookahead"]["sequence"] == runs["plain"]["sequence"]
        print(f"lookahead first call {runs['lookahead']['wall_s']:.2f} s ({runs['lookahead']['accepted_per_step']:.2f}"
              f" tokens/step), plain first call {runs['plain']['wall_s']:.2f} s", flush=True)
    la, plain = statistics.median(walls["lookahead"]), statistics.median(walls["plain"])
    print(f"median: lookahead {la:.2f} s, plain {plain:.2f} s -> {la / plain:.2f}x; identical outputs: {same}")


if __name__ == "__main__":
    main()
