"""Thread for thread against vLLM's CPU build: vLLM plain and vLLM ngram (K=5) against our plain and our lookahead,
greedy, one thread each, one process per system, the first 12 Spec-Bench first turns x 128 new tokens, one prompt at
a time, in bf16 (or --dtype). Reports tokens per second of wall time and per CPU second of the process (a process
on one thread: the CPU figure leaves out time other processes took from it on a shared machine), and whether our
lookahead equals our plain. vLLM runs in `.venv-vllm` (`make vllm-venv`) through lookahead.benchmarks.vllm_runner.

    python profiling/vs_vllm.py --dtype bf16 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OURS = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from lookahead.engine.pricing import calibrate
from lookahead.models.auto import load_model
job = json.load(open(sys.argv[1]))
model, _ = load_model(job["model"], job["dtype"], "cpu")
calibrate(model)  # the verify cost curve of this dtype and thread count: measured once, cached, untimed
prompts = [torch.tensor([p]) for p in job["prompts"]]
model.generate(prompts[0], max_new_tokens=8)  # untimed warm-up
model.state.forget_drafting()
out = {}
for lookahead in (False, True):
    wall = cpu = 0.0
    tokens, steps, seqs = 0, 0, []
    for ids in prompts:  # lookahead's drafting memory: only its own earlier outputs
        t0, c0 = time.perf_counter(), time.process_time()
        r = model.generate(ids, max_new_tokens=job["max_tokens"], lookahead=lookahead, return_dict_in_generate=True)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        tokens += r.stats.new_tokens
        steps += r.stats.steps
        seqs.append(r.sequences[0, ids.shape[1]:].tolist())
    out["lookahead" if lookahead else "plain"] = {"tokens": tokens, "wall_s": wall, "cpu_s": cpu,
                                                  "tokens_per_step": tokens / steps, "sequences": seqs}
json.dump(out, open(sys.argv[2], "w"))
"""


def run_ours(model: str, dtype: str, prompts: list[list[int]], max_tokens: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as work:
        Path(work, "job.json").write_text(json.dumps({"model": model, "dtype": dtype, "prompts": prompts,
                                                      "max_tokens": max_tokens}))
        done = subprocess.run([sys.executable, "-c", OURS, "job.json", "out.json"], cwd=work, env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        return json.loads(Path(work, "out.json").read_text())


def run_vllm(model_dir: str, dtype: str, prompts: list[list[int]], max_tokens: int, vllm_python: str) -> dict:
    from lookahead.benchmarks.vllm_runner import CPU_ENV

    job = {"model": model_dir, "dtype": {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype],
           "max_tokens": max_tokens, "repeats": 1, "groups": [[[p] for p in prompts]],
           "configs": [{"name": "vLLM plain", "speculative_config": None},
                       {"name": "vLLM ngram K=5", "speculative_config": {
                           "method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2,
                           "prompt_lookup_max": 4}}]}
    out = {}
    for config in job["configs"]:  # one process per system
        one = {**job, "configs": [config]}
        with tempfile.TemporaryDirectory() as work:
            Path(work, "job.json").write_text(json.dumps(one))
            env = {**os.environ, **CPU_ENV, "PYTHONPATH": str(ROOT)}
            done = subprocess.run([vllm_python, "-m", "lookahead.benchmarks.vllm_runner", "job.json", "result.json"],
                                  cwd=work, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            records = json.loads(Path(work, "result.json").read_text())["configs"][0]["groups"][0]
        generated = sum(r["generated"] for r in records)
        accepted = sum(r.get("accepted", 0) for r in records)
        out[config["name"]] = {"tokens": generated, "wall_s": sum(r["wall_s"][0] for r in records),
                               "cpu_s": sum(r["cpu_s"][0] for r in records),
                               "tokens_per_step": generated / max(generated - accepted, 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from lookahead.data import encode_prompt, spec_bench_first_turns
    from lookahead.kernels.cpu import cpu_name
    from lookahead.models import resolve_checkpoint

    model_dir = str(resolve_checkpoint(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [encode_prompt(tokenizer, t, chat=True)[0].tolist()
               for _, t in spec_bench_first_turns(1)[:args.prompts]]
    results = {}
    vllm = run_vllm(model_dir, args.dtype, prompts, args.max_tokens, args.vllm_python)
    results.update(vllm)
    ours = run_ours(args.model, args.dtype, prompts, args.max_tokens)
    same = sum(a == b for a, b in zip(ours["plain"]["sequences"], ours["lookahead"]["sequences"]))
    results["ours plain"], results["ours lookahead"] = ours["plain"], ours["lookahead"]
    print(f"{cpu_name()}, 1 thread per system, {args.dtype}, {len(prompts)} Spec-Bench prompts x {args.max_tokens} "
          f"tokens, one at a time")
    print(f"| system | tok/s (wall) | tok/s (per CPU s) | tokens/step |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens'] / r['wall_s']:.1f} | {r['tokens'] / r['cpu_s']:.1f} | "
              f"{r['tokens_per_step']:.2f} |")
    vp, vn = results["vLLM plain"], results["vLLM ngram K=5"]
    op, ol = results["ours plain"], results["ours lookahead"]
    rate = lambda r, key: r["tokens"] / r[key]  # noqa: E731
    for key in ("wall_s", "cpu_s"):
        print(f"{key[:-2]}: ours plain / vLLM plain {rate(op, key) / rate(vp, key):.2f}x, ours lookahead / vLLM "
              f"ngram {rate(ol, key) / rate(vn, key):.2f}x")
    print(f"ours lookahead == ours plain on {same}/{len(prompts)} prompts")
    if args.out:
        for r in results.values():
            r.pop("sequences", None)
        Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "dtype": args.dtype, "results": results,
                                              "identical": same, "prompts": len(prompts)}, indent=1))


if __name__ == "__main__":
    main()
