"""Where a CPU decode step goes: SmolLM2 fp32, a verify step of T nodes behind 256 committed tokens, timed (median
of repeats, interleaved across T) and broken down by torch.profiler into linear layers, attention, and the rest.

    python profiling/cpu_step.py --threads 1 --sizes 1 8 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from lookahead.cache import KVCache
from lookahead.models.auto import load_model

LINEAR = ("lookahead::linear", "mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear")
ATTENTION = ("lookahead::tree_attention", "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::bmm", "aten::baddbmm", "aten::softmax", "aten::_softmax")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, args.dtype, "cpu")
    cfg = model.config
    cache = KVCache(cfg.n_layers, 1, cfg.n_kv_heads, args.context + max(args.sizes), cfg.head_dim, model.dtype,
                    model.device)
    steps = {}
    for T in args.sizes:
        tokens = torch.randint(0, cfg.vocab_size, (1, T))
        depths = torch.arange(T)[None]
        steps[T] = (lambda tokens=tokens, depths=depths: model.verify(tokens, depths, cache, None))
    times = defaultdict(list)
    with torch.inference_mode():
        cache.lens.fill_(args.context)
        for run in steps.values():
            run()
        for _ in range(args.repeats):  # interleaved, so drift hits every size alike
            for T, run in steps.items():
                t0 = time.perf_counter()
                run()
                times[T].append(time.perf_counter() - t0)
        base = statistics.median(times[args.sizes[0]])
        print(f"{args.threads} thread(s), context {args.context}, median of {args.repeats}:")
        for T in args.sizes:
            ms = 1e3 * statistics.median(times[T])
            print(f"  T={T:3d}: {ms:7.2f} ms  ({ms / 1e3 / base:.2f}x T={args.sizes[0]}; "
                  f"{1e3 / ms:.1f} plain steps/s)" if T == 1 else f"  T={T:3d}: {ms:7.2f} ms  "
                  f"({ms / 1e3 / base:.2f}x T={args.sizes[0]})")
        for T in sorted({args.sizes[0], args.sizes[-1]}):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    steps[T]()
            buckets = defaultdict(float)
            total = 0.0
            for e in prof.key_averages():
                if e.key.split("::")[0] in ("aten", "mkldnn", "lookahead"):
                    own = e.self_cpu_time_total / 10 / 1e3  # ms per step
                    total += own
                    kind = "linear" if e.key in LINEAR else "attention" if e.key in ATTENTION else e.key
                    buckets[kind] += own
            print(f"  profile T={T}: {total:.2f} ms of ops per step")
            for kind, ms in sorted(buckets.items(), key=lambda kv: -kv[1])[:12]:
                print(f"    {kind:55s} {ms:7.2f} ms  {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
