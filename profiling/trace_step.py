"""Which package files one decode step of `generate()` runs through: a `sys.setprofile` trace of every Python call
made inside `Engine.step` (greedy, lookahead on, SmolLM2), counting per step the package source files entered and
the file-to-file crossings (a call from one package file into another). Run it on two checkouts to compare.

    python profiling/trace_step.py [--tokens 24] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--dtype", default="bf16")
    args = p.parse_args()

    import torch

    import lookahead
    from lookahead.models.auto import load_model

    package = str(Path(lookahead.__file__).parent) + "/"
    try:
        from lookahead.engine.engine import Engine
    except ImportError:  # checkouts before the package layout
        from lookahead.engine import Engine

    model, tok = load_model("smollm2-135m-instruct", args.dtype, "cpu")
    ids = tok("Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
              return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=8)  # warm: cost curves, the engine, the C++ ops

    steps: list[tuple[set, int, Counter]] = []
    original = Engine.step

    def traced(self, *a, **kw):
        files: set[str] = set()
        edges: Counter = Counter()
        crossings = 0

        def profile(frame, event, arg):
            nonlocal crossings
            if event != "call":
                return
            callee = frame.f_code.co_filename
            if not callee.startswith(package):
                return
            files.add(callee)
            caller = frame.f_back
            while caller is not None and not caller.f_code.co_filename.startswith(package):
                caller = caller.f_back  # through torch / stdlib frames to the package file that called
            if caller is not None and caller.f_code.co_filename != callee:
                crossings += 1
                edges[(caller.f_code.co_filename[len(package):], callee[len(package):])] += 1

        sys.setprofile(profile)
        try:
            return original(self, *a, **kw)
        finally:
            sys.setprofile(None)
            steps.append((files, crossings, edges))

    Engine.step = traced
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=args.tokens)
    Engine.step = original

    every = set().union(*(f for f, _, _ in steps))
    counts = [len(f) for f, _, _ in steps]
    crossings = [c for _, c, _ in steps]
    print(f"{len(steps)} decode steps; files per step: max {max(counts)}, median {statistics.median(counts)}; "
          f"crossings per step: max {max(crossings)}, median {statistics.median(crossings)}, min {min(crossings)}")
    print(f"{len(every)} files in all:")
    for f in sorted(every):
        print("  ", f[len(package):])
    worst = max(steps, key=lambda s: s[1])[2]
    print("crossings of the busiest step (caller -> callee: calls):")
    for (a, b), n in sorted(worst.items(), key=lambda kv: -kv[1]):
        print(f"   {a} -> {b}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
