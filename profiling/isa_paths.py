"""The CPU decode step on the code paths of other x86 hosts, measured on this one: for each -march given, the C++
ops are built as such a host builds them (LOOKAHEAD_CPU_ARCH) and, for the AVX2 path, torch's own kernels are held
to AVX2 too (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), then profiling/cpu_step.py prints
the plain step, its share of the memory roofline and the verify curve T = 1..16 in each dtype. Each path runs in
its own process (the variables must be set before torch loads); --rounds alternates the paths, so that drift on a
shared machine hits each alike. docs/hosts.md says what the paths are and what was measured.

    python profiling/isa_paths.py --arch x86-64-v3 x86-64-v4 native --threads 1 --dtypes fp32 bf16 --rounds 2

--prefill 1024 adds the time to first token of a 1024-token prompt, ours against transformers fp32.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What a host of each kind runs: the -march its ops get (what `-march=native` gives on such a CPU) and the ISA
# torch's kernels may use there. x86-64-v3 = AVX2 + FMA + F16C (AMD Zen 2/3, Intel client CPUs since Haswell);
# x86-64-v4 = AVX-512 F/BW/DQ/VL without BF16 (Intel Skylake-SP to Ice Lake); torch keeps its own AVX-512 there.
TORCH_ISA = {"x86-64-v3": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                           "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def emulated_env(arch: str) -> dict[str, str]:
    """The environment of a process that runs the arch's code path (the ops built with -march=arch)."""
    env = {**os.environ, "LOOKAHEAD_CPU_ARCH": arch, "PYTHONPATH": str(ROOT)}
    env.update(TORCH_ISA.get(arch, {}))
    return env


# Time to first token of a prompt of random tokens (`generate(max_new_tokens=1)`): ours in each dtype and
# transformers in fp32, in one process, rounds interleaved; the best of each.
PREFILL = r"""
import sys, time, torch
from transformers import AutoModelForCausalLM
from lookahead.models import resolve_checkpoint
from lookahead.models.auto import load_model
n, dtypes, rounds = int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
ids = torch.randint(100, 49000, (1, n), generator=torch.Generator().manual_seed(0))
systems = {f"ours {d}": load_model("smollm2-135m-instruct", d, "cpu")[0] for d in dtypes}
systems["transformers fp32"] = AutoModelForCausalLM.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"),
                                                                    dtype=torch.float32).eval()
best = {}
for r in range(rounds):
    for name, model in systems.items():
        t0 = time.perf_counter()
        with torch.inference_mode():
            if name.startswith("ours"):
                model.generate(ids, max_new_tokens=1, lookahead=False)
            else:
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
        best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
print(f"  time to first token, {n}-token prompt (best of {rounds}): "
      + ", ".join(f"{name} {s:.2f} s" for name, s in best.items()))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["x86-64-v3", "x86-64-v4", "native"],
                   help="-march names to build the ops for (x86-64-v3: AVX2; x86-64-v4: AVX-512F; native: this host)")
    p.add_argument("--rounds", type=int, default=1, help="run the paths this many times, alternating")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--prefill", type=int, default=0, metavar="N",
                   help="also the time to first token of an N-token prompt, ours against transformers fp32")
    args = p.parse_args()
    step = [sys.executable, str(ROOT / "profiling" / "cpu_step.py"), "--no-profile", "--threads", str(args.threads),
            "--dtypes", *args.dtypes, "--sizes", *map(str, args.sizes), "--repeats", str(args.repeats),
            "--context", str(args.context)]
    probe = ("from lookahead.kernels import cpu; cpu.available(); dt, why = cpu.auto_dtype(); "
             "print(f'code path {cpu.code_path()}; dtype auto = {dt}: {why}')")
    for r in range(args.rounds):
        for arch in args.arch:
            env = emulated_env(arch)
            torch_isa = " ".join(f"{k}={v}" for k, v in TORCH_ISA.get(arch, {}).items()) or "torch's own ISA"
            print(f"== round {r + 1}: LOOKAHEAD_CPU_ARCH={arch} ({torch_isa})", flush=True)
            subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, check=True)
            out = subprocess.run(step, env=env, cwd=ROOT, capture_output=True, text=True)
            print(out.stdout.rstrip() or out.stderr[-2000:], flush=True)
            if args.prefill:
                out = subprocess.run([sys.executable, "-c", PREFILL, str(args.prefill), ",".join(args.dtypes), "3",
                                      str(args.threads)], env=env, cwd=ROOT, capture_output=True, text=True)
                print(out.stdout.rstrip() or out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
