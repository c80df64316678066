"""Where a CPU decode step goes: SmolLM2 in fp32 / bf16 / fp16, a verify step of T nodes (a chain) behind `--context`
committed tokens, timed (median of repeats, interleaved across T and dtypes), against the memory roofline measured
in the same run (weight bytes a step reads / read bandwidth), and broken down by torch.profiler into linear
layers, attention, the other ops and the Python around them.

    python profiling/cpu_step.py --threads 2 --dtypes fp32 bf16 --sizes 1 2 4 8 16 32 64 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from lookahead.models.cache import KVCache
from lookahead.kernels.cpu import available, cpu_name
from lookahead.models.auto import load_model

LINEAR = ("lookahead::linear", "mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear")
ATTENTION = ("lookahead::tree_attention", "aten::scaled_dot_product_attention",
             "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm", "aten::baddbmm", "aten::softmax",
             "aten::_softmax")


def read_bandwidth() -> float:
    """GB/s of a sum over 1 GiB (as ../shared/tools/cpu_probe.py): the rate a step can read its weights at."""
    big = torch.empty(256 << 20, dtype=torch.float32).uniform_()
    big.sum()
    best = min(_timed(big.sum) for _ in range(5))
    return big.numel() * 4 / best / 1e9


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def weight_bytes(model) -> int:
    """Bytes of weights one step reads: every linear layer (the LM head included, tied or not) and the norms."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if name == "tok_embeddings.weight" and model.output.weight is not model.tok_embeddings.weight:
            continue  # an embedding table the head does not share (untied, or a repacked GGUF copy) is read a row
            # per token
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--no-profile", action="store_true", help="timings and the roofline only")
    p.add_argument("--quantization", choices=["gguf"], default=None,
                   help="keep a GGUF model's blocks (the native quantized kernels, docs/gguf.md); the dtype is then "
                        "the activations'")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {dt: load_model(args.model, dt, "cpu", quantization=args.quantization)[0]
              for dt in args.dtypes}
    steps = {}
    for dt, model in models.items():
        cfg = model.config
        cache = KVCache(cfg.n_layers, 1, cfg.n_kv_heads, args.context + max(args.sizes), cfg.head_dim, model.dtype,
                        model.device)
        cache.lens.fill_(args.context)
        for T in args.sizes:
            tokens = torch.randint(0, cfg.vocab_size, (1, T))
            depths = torch.arange(T)[None]
            steps[dt, T] = (lambda m=model, c=cache, tokens=tokens, depths=depths: m.verify(tokens, depths, c, None))
    times = defaultdict(list)
    with torch.inference_mode():
        for run in steps.values():
            run()
        for _ in range(args.repeats):  # interleaved, so drift hits every size and dtype alike
            for key, run in steps.items():
                times[key].append(_timed(run))
        bandwidth = read_bandwidth()
        print(f"{cpu_name()}; torch {torch.__version__}; {args.threads} thread(s); C++ CPU ops "
              f"{'on' if available() else 'off'}; context {args.context}; median of {args.repeats}; read bandwidth "
              f"{bandwidth:.1f} GB/s (sum over 1 GiB, same run)")
        for dt, model in models.items():
            roofline = weight_bytes(model) / bandwidth / 1e9
            base = statistics.median(times[dt, args.sizes[0]])
            curve = ", ".join(f"T={T} {1e3 * statistics.median(times[dt, T]):.1f} ms "
                              f"({statistics.median(times[dt, T]) / base:.2f}x)" for T in args.sizes)
            print(f"  {dt}: weights read per step {weight_bytes(model) / 1e6:.0f} MB -> roofline {1e3 * roofline:.1f} ms; "
                  f"T={args.sizes[0]} step {1e3 * base:.1f} ms = {100 * roofline / base:.0f}% of the roofline "
                  f"({1 / base:.1f} steps/s)\n    verify curve: {curve}")
        if args.no_profile:
            return
        for dt in models:
            for T in sorted({args.sizes[0], args.sizes[-1]}):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    wall = sum(_timed(steps[dt, T]) for _ in range(10)) / 10 * 1e3
                buckets = defaultdict(float)
                total = 0.0
                for e in prof.key_averages():
                    if e.key.split("::")[0] in ("aten", "mkldnn", "lookahead"):
                        own = e.self_cpu_time_total / 10 / 1e3  # ms per step
                        total += own
                        kind = "linear" if e.key in LINEAR else "attention" if e.key in ATTENTION else e.key
                        buckets[kind] += own
                print(f"  profile {dt} T={T}: {wall:.2f} ms per step (profiled), {total:.2f} ms inside ops, "
                      f"{wall - total:.2f} ms of Python and dispatch around them")
                for kind, ms in sorted(buckets.items(), key=lambda kv: -kv[1])[:8]:
                    print(f"    {kind:40s} {ms:7.2f} ms  {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
