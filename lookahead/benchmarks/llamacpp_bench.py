"""`lookahead bench-llamacpp`: ours against llama.cpp (llama-cpp-python 0.3.36, `make llamacpp-venv`) on the same GGUF
files, thread for thread (docs/gguf.md). Three suites, each written as llamacpp_<suite>.json / .md / .png under --out:

- smollm2: the shipped SmolLM2-135M-Instruct Q4_1 file and its Q4_K_M and Q8_0 requantizations (llama.cpp's
  quantizer, made once into $LOOKAHEAD_CACHE/llamacpp), greedy on Spec-Bench prompts: ours plain, ours lookahead,
  llama.cpp plain, llama.cpp prompt lookup. tokens/s, speedups, identical outputs, tokens per forward pass.
- decode: plain greedy decode ms/token of --gguf files, (time of n tokens - time of 1) / (n - 1), EOS never stopping
  it; load time and peak RSS of each system's process.
- quality: teacher-forced logits over ~1k tokens of Spec-Bench text, the same ids fed to every model: top-1
  agreement and |logit difference| of ours against llama.cpp on the same file and against our dequantized model.

Every timed run is a process of its own (lookahead/benchmarks/llamacpp_runner.py: ours under this python, llama.cpp
under --llamacpp-python), the systems interleaved within each round; each keeps its best of --rounds (per prompt
for smollm2), since the 2-core hosts this project runs on are shared with other jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from lookahead.benchmarks.llamacpp_runner import FTYPES, LLAMACPP_VERSION
from lookahead.benchmarks.report import write_report

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().with_name("llamacpp_runner.py")
SUITES = ("smollm2", "decode", "quality")
SMOLLM2 = "smollm2-135m-instruct"
SHIPPED_TYPE = "Q4_1"  # the embedded file's type; the others are made from it
SMOLLM2_TYPES = ("Q4_1", "Q4_K_M", "Q8_0")
# name -> (runner system, job fields): the four systems of the smollm2 suite, in the order each round runs them
GENERATE_SYSTEMS = {"ours plain": ("ours", {"lookahead": False}), "ours lookahead": ("ours", {"lookahead": True}),
                    "llama.cpp plain": ("llamacpp", {"lookup": False}),
                    "llama.cpp lookup": ("llamacpp", {"lookup": True})}
# name -> runner job fields: the models whose teacher-forced logits the quality suite compares
QUALITY_MODELS = {"ours": {"system": "ours"}, "ours fp32": {"system": "ours", "dtype": "fp32"},
                  "ours dequantized bf16": {"system": "ours", "dequantized": True, "dtype": "bf16"},
                  "ours dequantized fp32": {"system": "ours", "dequantized": True, "dtype": "fp32"},
                  "llama.cpp": {"system": "llamacpp"}}
# ours and llama.cpp against each other, and each against the same weights dequantized (fp32: the closest to exact)
QUALITY_PAIRS = [("ours", "llama.cpp"), ("ours fp32", "llama.cpp"), ("ours", "ours dequantized bf16"),
                 ("ours", "ours dequantized fp32"), ("ours fp32", "ours dequantized fp32"),
                 ("llama.cpp", "ours dequantized fp32")]


def add_arguments(p) -> None:
    p.add_argument("--suite", choices=SUITES, required=True)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, each system alike")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each system keeps its best")
    p.add_argument("--prompts", type=int, default=13, help="smollm2: Spec-Bench prompts, round-robin over categories")
    p.add_argument("--max-new-tokens", type=int, default=128, help="smollm2: per prompt (EOS stops earlier)")
    p.add_argument("--types", nargs="+", default=list(SMOLLM2_TYPES), choices=sorted(FTYPES),
                   help=f"smollm2: the file types ({SHIPPED_TYPE} is the shipped file, the others are made from it)")
    p.add_argument("--lookup-tokens", type=int, default=10, help="llama.cpp prompt lookup: draft tokens per step")
    p.add_argument("--gguf", type=Path, nargs="+",
                   help="decode: the files (required); quality: the files (default: the shipped SmolLM2)")
    p.add_argument("--tokens", type=int, default=65, help="decode: tokens timed per run")
    p.add_argument("--text-tokens", type=int, default=1024, help="quality: teacher-forced tokens of Spec-Bench text")
    p.add_argument("--llamacpp-python", type=Path, default=ROOT / ".venv-llamacpp" / "bin" / "python",
                   help="python of the venv holding llama-cpp-python (`make llamacpp-venv`)")
    p.add_argument("--out", type=Path, default=Path("bench_out/llamacpp"))


def validate(args) -> None:
    """ValueError naming the flag for arguments the suite cannot run with; FileNotFoundError for a missing file."""
    if any(t < 1 for t in args.threads):
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    for flag in ("rounds", "prompts", "max_new_tokens", "lookup_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.tokens < 2:
        raise ValueError(f"--tokens must be >= 2 (time of n tokens - time of 1), got {args.tokens}")
    if args.text_tokens < 2:
        raise ValueError(f"--text-tokens must be >= 2, got {args.text_tokens}")
    if args.suite == "decode" and not args.gguf:
        raise ValueError("--suite decode needs --gguf FILE... (e.g. the files profiling/make_1b_gguf.py makes)")
    if args.suite == "smollm2" and args.gguf:
        raise ValueError("--suite smollm2 runs the shipped SmolLM2 and its requantizations: --types, not --gguf")
    for path in args.gguf or []:
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
    if not args.llamacpp_python.is_file():
        raise FileNotFoundError(f"{args.llamacpp_python} is missing: `make llamacpp-venv` installs "
                                f"{LLAMACPP_VERSION} there")


def run(args) -> int:
    validate(args)
    suite = {"smollm2": smollm2_suite, "decode": decode_suite, "quality": quality_suite}[args.suite]
    record, markdown, draw = suite(args)
    record = {"suite": args.suite, **machine(), **record}
    markdown = f"{record['cpu']}, {record['cores']} cores, {record['date']}. {markdown}"
    write_report(args.out, f"llamacpp_{args.suite}", record, markdown, draw)
    print(markdown)
    return 0


def machine() -> dict:
    from lookahead.kernels.cpu import cpu_name

    return {"date": date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(), "llamacpp": LLAMACPP_VERSION,
            "load_average_at_end": os.getloadavg()[0]}


def run_job(python: Path, job: dict) -> dict:
    """One runner process: the job as JSON in, its result as JSON out; RuntimeError with its stderr if it fails."""
    with tempfile.TemporaryDirectory() as work:
        Path(work, "job.json").write_text(json.dumps(job))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run([str(python), str(RUNNER), "job.json", "result.json"], cwd=work, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{job['system']} {job['task']} on {job['gguf']} failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(work, "result.json").read_text())


def _python(args, system: str) -> Path:
    return args.llamacpp_python if system == "llamacpp" else Path(sys.executable)


# smollm2: Spec-Bench, plain and drafted, both systems

def smollm2_files(args) -> dict[str, Path]:
    """type -> file: the shipped Q4_1, the others requantized from it by llama.cpp once into $LOOKAHEAD_CACHE."""
    from lookahead.config import cache_dir
    from lookahead.models.checkpoint import embedded_gguf

    shipped = embedded_gguf(SMOLLM2)
    files = {}
    for kind in args.types:
        if kind == SHIPPED_TYPE:
            files[kind] = shipped
            continue
        dst = cache_dir() / "llamacpp" / f"{shipped.stem.removesuffix('.' + SHIPPED_TYPE)}.{kind}.gguf"
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            partial = dst.with_suffix(".partial")
            run_job(args.llamacpp_python, {"system": "llamacpp", "task": "quantize", "gguf": str(shipped),
                                           "dst": str(partial), "type": kind, "threads": max(args.threads)})
            partial.rename(dst)
        files[kind] = dst
    return files


def spec_bench_prompts(tokenizer, n: int) -> list[tuple[str, list[int]]]:
    """(category, chat-template ids) of the first n Spec-Bench first turns, round-robin over the categories."""
    from lookahead.data import encode_prompt, spec_bench_first_turns

    return [(c, encode_prompt(tokenizer, text, chat=True)[0].tolist()) for c, text in spec_bench_first_turns(None)[:n]]


def best_runs(rounds: list[list[dict]]) -> list[dict]:
    """Per prompt, over the rounds of one system: the first round's tokens and steps, the least seconds, and whether
    any round gave other tokens (greedy on one file and thread count should not)."""
    best = []
    for runs in zip(*rounds):
        best.append({"tokens": runs[0]["tokens"], "steps": runs[0]["steps"],
                     "seconds": min(r["seconds"] for r in runs),
                     "rounds_differ": any(r["tokens"] != runs[0]["tokens"] for r in runs)})
    return best


def identical(a: list[dict], b: list[dict]) -> int:
    """How many prompts two systems answered with the same tokens."""
    if len(a) != len(b):
        raise ValueError(f"the systems ran {len(a)} and {len(b)} prompts")
    return sum(x["tokens"] == y["tokens"] for x, y in zip(a, b))


def summarize_generation(runs: dict[str, list[dict]]) -> dict:
    """System name -> best runs (GENERATE_SYSTEMS' names) -> per system tokens, seconds, tokens/s, ms/token and
    tokens per forward pass; the speedups; the identical-output counts."""
    systems = {}
    for name, rs in runs.items():
        tokens = sum(len(r["tokens"]) for r in rs)
        seconds = sum(r["seconds"] for r in rs)
        steps = sum(r["steps"] for r in rs)
        systems[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "ms_per_token": 1e3 * seconds / max(tokens, 1), "tokens_per_step": tokens / max(steps, 1),
                         "rounds_differ": sum(r["rounds_differ"] for r in rs)}
    pairs = {"ours lookahead / ours plain": ("ours lookahead", "ours plain"),
             "llama.cpp lookup / llama.cpp plain": ("llama.cpp lookup", "llama.cpp plain"),
             "ours plain / llama.cpp plain": ("ours plain", "llama.cpp plain"),
             "ours lookahead / llama.cpp lookup": ("ours lookahead", "llama.cpp lookup")}
    speedups = {label: systems[a]["tokens_per_s"] / systems[b]["tokens_per_s"]
                for label, (a, b) in pairs.items() if a in systems and b in systems}
    same = {label: identical(runs[a], runs[b]) for label, (a, b) in pairs.items()
            if a in runs and b in runs and label != "ours lookahead / llama.cpp lookup"}
    return {"prompts": len(next(iter(runs.values()))), "systems": systems, "speedups": speedups, "identical": same}


def smollm2_suite(args):
    from lookahead.models.gguf import tokenizer as gguf_tokenizer

    files = smollm2_files(args)
    tokenizer = gguf_tokenizer(files[args.types[0]])  # every file holds the same tokenizer
    prompts = spec_bench_prompts(tokenizer, args.prompts)
    eos = [tokenizer.eos_token_id]
    rounds: dict[tuple[str, int, str], list[list[dict]]] = {}
    described = {}
    for r in range(args.rounds):
        for threads in args.threads:
            for kind, path in files.items():
                for name, (system, fields) in GENERATE_SYSTEMS.items():
                    job = {"system": system, "task": "generate", "gguf": str(path), "threads": threads,
                           "prompts": [ids for _, ids in prompts], "max_new_tokens": args.max_new_tokens, "eos": eos,
                           "lookahead": fields.get("lookahead", False),
                           "lookup_tokens": args.lookup_tokens if fields.get("lookup") else 0}
                    result = run_job(_python(args, system), job)
                    described[kind, name] = result["system"]
                    rounds.setdefault((kind, threads, name), []).append(result["runs"])
                    ms = 1e3 * sum(x["seconds"] for x in result["runs"]) / max(sum(len(x["tokens"]) for x in
                                                                                   result["runs"]), 1)
                    print(f"round {r} {kind} {threads}t {name}: {ms:.1f} ms/token", file=sys.stderr, flush=True)
    results = []
    for threads in args.threads:
        for kind in files:
            best = {name: best_runs(rounds[kind, threads, name]) for name in GENERATE_SYSTEMS}
            results.append({"type": kind, "threads": threads, **summarize_generation(best),
                            "categories": [c for c, _ in prompts],
                            "outputs": {name: [x["tokens"] for x in rs] for name, rs in best.items()}})
    record = {"files": {k: str(p) for k, p in files.items()}, "systems": {f"{k} {n}": s for (k, n), s in
                                                                           described.items()},
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
              "lookup_tokens": args.lookup_tokens, "results": results}
    return record, smollm2_markdown(record), smollm2_plot(record)


def smollm2_markdown(record: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct, {record['prompts']} Spec-Bench prompts (chat template) x up to "
             f"{record['max_new_tokens']} new tokens, greedy, best of {record['rounds']} interleaved rounds per prompt, "
             f"each system in its own process; llama.cpp lookup: LlamaPromptLookupDecoding, "
             f"{record['lookup_tokens']} tokens. tokens/step: tokens per forward pass, the prefill counted.", "",
             "| file | threads | ours plain tok/s | ours lookahead tok/s | llama.cpp plain tok/s | llama.cpp lookup tok/s "
             "| lookahead / ours plain | lookup / llama.cpp plain | ours / llama.cpp plain | ours lookahead / lookup "
             "| ours tokens/step | lookup tokens/step | identical: lookahead = plain | lookup = llama.cpp plain "
             "| ours plain = llama.cpp plain |", "|" + "---|" * 15]
    for res in record["results"]:
        s, n = res["systems"], res["prompts"]
        speed = [f"{s[name]['tokens_per_s']:.1f}" for name in GENERATE_SYSTEMS]
        ratios = [f"{v:.2f}x" for v in res["speedups"].values()]
        same = [f"{v}/{n}" for v in res["identical"].values()]
        lines.append(f"| {res['type']} | {res['threads']} | " + " | ".join(
            speed + ratios + [f"{s['ours lookahead']['tokens_per_step']:.2f}",
                              f"{s['llama.cpp lookup']['tokens_per_step']:.2f}"] + same) + " |")
    unstable = [f"{res['type']} {res['threads']}t {name}" for res in record["results"]
                for name, s in res["systems"].items() if s["rounds_differ"]]
    if unstable:
        lines += ["", f"Rounds gave other tokens for: {', '.join(unstable)} (the first round's are reported)."]
    return "\n".join(lines)


def smollm2_plot(record: dict):
    def draw(plt):
        fig, ax = plt.subplots(figsize=(10, 4))
        groups = [f"{r['type']} {r['threads']}t" for r in record["results"]]
        width = 0.8 / len(GENERATE_SYSTEMS)
        for i, name in enumerate(GENERATE_SYSTEMS):
            ax.bar([g + i * width for g in range(len(groups))],
                   [r["systems"][name]["tokens_per_s"] for r in record["results"]], width, label=name)
        ax.set_xticks([g + width * (len(GENERATE_SYSTEMS) - 1) / 2 for g in range(len(groups))], groups)
        ax.set_ylabel("tokens/s (shared machine)")
        ax.set_title("SmolLM2-135M on Spec-Bench: ours vs llama.cpp")
        ax.legend()
        return fig
    return draw


# decode: ms/token of plain greedy decode on the same file

def decode_suite(args):
    best: dict[tuple[str, int, str], dict] = {}
    for r in range(args.rounds):
        for threads in args.threads:
            for path in args.gguf:
                for system in ("ours", "llamacpp"):
                    res = run_job(_python(args, system), {"system": system, "task": "decode", "gguf": str(path),
                                                          "threads": threads, "tokens": args.tokens})
                    print(f"round {r} {path.name} {threads}t {system}: {res['ms_per_token']:.1f} ms/token, load "
                          f"{res['load_s']:.1f} s, peak RSS {res['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
                    key = (str(path), threads, system)
                    if key not in best or res["ms_per_token"] < best[key]["ms_per_token"]:
                        best[key] = res
    rows = [summarize_decode(str(path), path.stat().st_size, threads, best[str(path), threads, "ours"],
                             best[str(path), threads, "llamacpp"])
            for threads in args.threads for path in args.gguf]
    record = {"tokens": args.tokens, "rounds": args.rounds, "rows": rows}
    return record, decode_markdown(record), decode_plot(record)


def summarize_decode(path: str, size: int, threads: int, ours: dict, llamacpp: dict) -> dict:
    """One file and thread count: both systems' best runs and ours / llama.cpp decode speed."""
    return {"file": path, "mb": size / 1e6, "threads": threads, "ours": ours, "llamacpp": llamacpp,
            "speed_vs_llamacpp": llamacpp["ms_per_token"] / ours["ms_per_token"]}


def decode_markdown(record: dict) -> str:
    lines = [f"Plain greedy decode, (time of {record['tokens']} tokens - time of 1) / {record['tokens'] - 1}, EOS never "
             f"stops it; each system in its own process, best of {record['rounds']} interleaved rounds.", "",
             "| file | MB | threads | ours ms/token | llama.cpp ms/token | ours / llama.cpp speed | ours load s | "
             "llama.cpp load s | ours peak RSS GB | llama.cpp peak RSS GB | ours |", "|" + "---|" * 11]
    for r in record["rows"]:
        o, lc = r["ours"], r["llamacpp"]
        lines.append(f"| {Path(r['file']).name} | {r['mb']:.0f} | {r['threads']} | {o['ms_per_token']:.1f} | "
                     f"{lc['ms_per_token']:.1f} | {r['speed_vs_llamacpp']:.2f}x | {o['load_s']:.1f} | "
                     f"{lc['load_s']:.1f} | {o['peak_rss_gb']:.2f} | {lc['peak_rss_gb']:.2f} | {o['system']} |")
    return "\n".join(lines)


def decode_plot(record: dict):
    def draw(plt):
        fig, ax = plt.subplots(figsize=(8, 4))
        rows = record["rows"]
        labels = [f"{Path(r['file']).stem} {r['threads']}t" for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["ours"]["ms_per_token"] for r in rows], 0.4, label="ours")
        ax.bar([x + 0.2 for x in xs], [r["llamacpp"]["ms_per_token"] for r in rows], 0.4, label="llama.cpp")
        ax.set_xticks(list(xs), labels, rotation=20)
        ax.set_ylabel("ms/token (shared machine)")
        ax.set_title("Plain decode on the same GGUF file")
        ax.legend()
        return fig
    return draw


# quality: teacher-forced logits, ours against llama.cpp and against our dequantized model

def spec_bench_text_ids(tokenizer, n: int) -> list[int]:
    """The first n token ids of the Spec-Bench first turns joined by blank lines (round-robin over the categories),
    tokenized without special tokens: the text every model of the quality suite is fed."""
    from lookahead.data import spec_bench_first_turns

    ids: list[int] = []
    for _, text in spec_bench_first_turns(None):
        ids += tokenizer(("\n\n" if ids else "") + text, add_special_tokens=False).input_ids
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"Spec-Bench's prompts hold only {len(ids)} tokens, fewer than --text-tokens {n}")


def agreement(a, b) -> dict:
    """Two models' logits over the same positions, (T, V) each: the share of positions whose argmax agrees, and the
    max and mean |difference| over all T * V logits."""
    import numpy as np

    if a.shape != b.shape:
        raise ValueError(f"logits of shapes {a.shape} and {b.shape} cannot be compared")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {"top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()), "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean())}


def quality_suite(args):
    import numpy as np

    from lookahead.models.checkpoint import embedded_gguf
    from lookahead.models.gguf import tokenizer as gguf_tokenizer

    files = args.gguf or [embedded_gguf(SMOLLM2)]
    threads = max(args.threads)  # not timed: the most threads asked for
    results = []
    for path in files:
        ids = spec_bench_text_ids(gguf_tokenizer(path), args.text_tokens)
        logits, described = {}, {}
        with tempfile.TemporaryDirectory() as work:
            for name, fields in QUALITY_MODELS.items():
                npy = Path(work, f"{len(logits)}.npy")
                res = run_job(_python(args, fields["system"]), {**fields, "task": "logits", "gguf": str(path),
                                                                "threads": threads, "ids": ids,
                                                                "logits_path": str(npy)})
                described[name] = res["system"]
                logits[name] = np.load(npy)
            pairs = [{"a": a, "b": b, **agreement(logits[a], logits[b])} for a, b in QUALITY_PAIRS]
        logit_range = float(max(np.abs(x).max() for x in logits.values()))
        results.append({"file": str(path), "tokens": len(ids), "models": described, "pairs": pairs,
                        "max_abs_logit": logit_range})
    record = {"text_tokens": args.text_tokens, "threads": threads, "results": results}
    return record, quality_markdown(record), quality_plot(record)


def quality_markdown(record: dict) -> str:
    lines = [f"Teacher-forced over the first {record['text_tokens']} tokens of Spec-Bench's prompts (joined by blank "
             "lines, no special tokens), the same ids fed to every model; |diff| over all positions x vocabulary.", ""]
    for res in record["results"]:
        lines += [f"### {Path(res['file']).name}", "", *(f"- {name}: {desc}" for name, desc in res["models"].items()),
                  f"- largest |logit|: {res['max_abs_logit']:.1f}", "",
                  "| model | against | top-1 agreement | max abs diff | mean abs diff |", "|---|---|---|---|---|"]
        lines += [f"| {p['a']} | {p['b']} | {p['top1_agreement']:.4f} | {p['max_abs_diff']:.3f} | "
                  f"{p['mean_abs_diff']:.4f} |" for p in res["pairs"]]
        lines.append("")
    return "\n".join(lines)


def quality_plot(record: dict):
    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.5 * len(QUALITY_PAIRS)), sharey=True)
        height = 0.8 / len(record["results"])
        for i, res in enumerate(record["results"]):
            ys = [y + i * height for y in range(len(res["pairs"]))]
            axes[0].barh(ys, [p["top1_agreement"] for p in res["pairs"]], height, label=Path(res["file"]).name)
            axes[1].barh(ys, [p["max_abs_diff"] for p in res["pairs"]], height, label=Path(res["file"]).name)
        labels = [f"{p['a']} vs {p['b']}" for p in record["results"][0]["pairs"]]
        axes[0].set_yticks([y + height * (len(record["results"]) - 1) / 2 for y in range(len(labels))], labels)
        axes[0].invert_yaxis()
        for ax, title in zip(axes, ("top-1 agreement", "max |logit diff|")):
            ax.set_title(title)
            ax.legend(fontsize=7)
        return fig
    return draw
