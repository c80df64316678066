"""`lookahead bench-serve`: the server under load, lookahead on vs off, at several concurrencies.

For each mode (plain = `--no-lookahead`, lookahead) and each concurrency a fresh server process starts (an empty
trie: nothing drafts from an earlier run), takes one short untimed warm-up request, then N Spec-Bench first
turns (chat template, greedy, streamed) are sent by `concurrency` clients that each send their next prompt as
soon as the last one finished. Within a run the trie holds the outputs of the prompts finished before (never
the measured prompt's own output), as in `lookahead bench`'s warm protocol.

Per run: requests/s and output tokens/s over the wall time, time to first token and time per output token
(after the first) p50/p99 per request, accepted tokens/step (completion tokens over forward passes, from
`usage.lookahead`), and how many outputs equal the plain server's at concurrency 1. Writes JSON, a Markdown
table and a PNG plot.

`--soak ROUNDS`: memory instead of speed. One lookahead server takes ROUNDS rounds of distinct long prompts
(Spec-Bench first turns joined to --prompt-tokens) at one concurrency; /v1/stats' memory by part is read when
idle and after each round, and the greedy answers to four short questions before and after must be the same.

The baseline the server is held to: `generate()` on the same prompts, one after another, in a fresh process of
its own (mode "generate-plain" / "generate-lookahead", concurrency 1), with the same warm-up request and the same
drafting memory protocol (a fresh trie that learns from the earlier outputs).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookahead.benchmarks.report import write_report

DEFAULT_MODEL = "smollm2-135m-instruct"
START_TIMEOUT_S = 900  # model load, plus a cost-curve measurement on a machine that has none cached


@dataclass
class RequestResult:
    prompt: int              # index into the prompt list
    ttft_s: float            # time to the first text
    latency_s: float         # time to the last chunk
    completion_tokens: int
    steps: int               # usage.lookahead.engine.step: forward passes that produced this request's tokens
    text: str
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for a request of one token."""
        if self.completion_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.completion_tokens - 1)


async def _one(client, url: str, model: str, index: int, messages: list[dict], max_tokens: int) -> RequestResult:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage, pieces = None, None, []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            error = (await response.aread()).decode(errors="replace")
            return RequestResult(index, 0.0, time.perf_counter() - t0, 0, 0, "", f"{response.status_code}: {error}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return RequestResult(index, 0.0, time.perf_counter() - t0, 0, 0, "", chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", ()):
                content = choice["delta"].get("content")
                if content:
                    pieces.append(content)
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    if usage is None:
        return RequestResult(index, 0.0, latency, 0, 0, "".join(pieces), "the stream ended without usage")
    return RequestResult(index, ttft if ttft is not None else latency, latency, usage["completion_tokens"],
                         usage["lookahead"]["steps"], "".join(pieces))


async def run_load(url: str, model: str, conversations: list[list[dict]], concurrency: int,
                   max_tokens: int) -> tuple[list[RequestResult], float]:
    """Send every conversation once from `concurrency` clients in a closed loop -> (results in prompt order,
    wall seconds)."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(conversations):
        queue.put_nowait(item)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:

        async def worker():
            while not queue.empty():
                index, messages = queue.get_nowait()
                results.append(await _one(client, url, model, index, messages, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return sorted(results, key=lambda r: r.prompt), wall


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [1e3 * r.ttft_s for r in ok]
    tpot = [1e3 * r.tpot_s for r in ok if r.tpot_s is not None]

    def pct(values, q):
        return float(np.percentile(values, q)) if values else float("nan")

    return {"requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
            "requests_per_s": len(ok) / wall, "output_tokens_per_s": tokens / wall,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
            "accepted_per_step": tokens / max(sum(r.steps for r in ok), 1)}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m lookahead.serve` on a free port of 127.0.0.1 with an empty trie; stopped with SIGINT."""

    def __init__(self, model: str, lookahead: bool, max_batch: int, log_path: Path, dtype: str | None = None,
                 device: str | None = None, threads: int | None = None, extra: tuple[str, ...] = ()):
        import httpx

        host = "127.0.0.1"
        self.port = _free_port(host)
        self.url = f"http://{host}:{self.port}"
        cmd = [sys.executable, "-m", "lookahead.serve", "--model", model, "--host", host, "--port", str(self.port),
               "--max-batch", str(max_batch), "--log-level", "warning"]
        cmd += [] if lookahead else ["--no-lookahead"]
        cmd += ["--dtype", dtype] if dtype else []
        cmd += ["--device", device] if device else []
        cmd += ["--threads", str(threads)] if threads else []
        cmd += list(extra)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server did not answer within {START_TIMEOUT_S}s; see {log_path}")
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


COPY_HEAVY = ("rag", "summarization", "extraction")  # Spec-Bench's categories whose answers copy from the prompt


def conversations(num_prompts: int, prompt_set: str = "spec-bench") -> list[list[dict]]:
    """The first `num_prompts` Spec-Bench first turns, round-robin over the categories (prompt_set "copy-heavy": over
    rag, summarization and extraction only), as chat messages."""
    from lookahead.data import spec_bench_first_turns

    if prompt_set not in ("spec-bench", "copy-heavy"):
        raise ValueError(f"prompt_set must be 'spec-bench' or 'copy-heavy', got {prompt_set!r}")
    items = spec_bench_first_turns(None, list(COPY_HEAVY) if prompt_set == "copy-heavy" else None)[:num_prompts]
    if len(items) < num_prompts:
        raise ValueError(f"Spec-Bench has {len(items)} prompts, {num_prompts} were asked for")
    return [[{"role": "user", "content": text}] for _, text in items]


def _generate_run(model_name: str, convs: list[list[dict]], max_tokens: int, lookahead: bool, dtype: str | None,
                  device: str | None, threads: int | None) -> tuple[list[dict], float]:
    """In a fresh process: generate() on each conversation in turn -> per-request records and the wall time."""
    import torch

    from lookahead.data import encode_chat
    from lookahead.models.auto import load_model
    from lookahead.serve.app import decode

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(model_name, dtype, device)

    def one(conv, n):
        ids = encode_chat(tokenizer, conv).to(model.device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, lookahead=lookahead, return_dict_in_generate=True)
        wall = time.perf_counter() - t0
        new = out.sequences[0, ids.shape[1]:out.stats.new_tokens + ids.shape[1]].tolist()
        return {"ttft_s": out.stats.prefill_s, "latency_s": wall, "completion_tokens": out.stats.new_tokens,
                "steps": out.stats.steps, "text": decode(tokenizer, new)}

    one([{"role": "user", "content": "Hello!"}], 4)  # the servers' warm-up request
    t0 = time.perf_counter()
    records = [one(conv, max_tokens) for conv in convs]
    return records, time.perf_counter() - t0


def generate_baseline(model: str, convs: list[list[dict]], max_tokens: int, lookahead: bool, dtype: str | None = None,
                      device: str | None = None, threads: int | None = None) -> tuple[list[RequestResult], float]:
    """generate() on the prompts one after another, in a process of its own (as each server has one)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        records, wall = pool.apply(_generate_run, (model, convs, max_tokens, lookahead, dtype, device, threads))
    return [RequestResult(i, r["ttft_s"], r["latency_s"], r["completion_tokens"], r["steps"], r["text"])
            for i, r in enumerate(records)], wall


def bench_serve(model: str = DEFAULT_MODEL, num_prompts: int = 8, max_tokens: int = 64,
                concurrencies: tuple[int, ...] = (1, 4, 8, 16), out: str | Path = "bench/serve", name: str = "serve",
                max_batch: int = 16, url: str | None = None, served_model_name: str | None = None,
                dtype: str | None = None, device: str | None = None, threads: int | None = None,
                baseline: bool = True, prompt_set: str = "spec-bench", server_args: tuple[str, ...] = ()) -> list[dict]:
    """Run the load for plain and lookahead servers (or only the server at `url`), and with `baseline` the same
    prompts through generate() in a process of its own; write `{out}/{name}.json`, `.md` and `.png`, and return
    the rows."""
    if num_prompts < 1 or max_tokens < 1 or not concurrencies or min(concurrencies) < 1:
        raise ValueError("num_prompts, max_tokens and every concurrency must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    convs = conversations(num_prompts, prompt_set)
    warmup = [[{"role": "user", "content": "Hello!"}]]
    modes = [("server", None)] if url else [("plain", False), ("lookahead", True)]
    rows, texts = [], {}
    if baseline and not url:
        for mode, lookahead in (("generate-plain", False), ("generate-lookahead", True)):
            results, wall = generate_baseline(model, convs, max_tokens, lookahead, dtype, device, threads)
            texts[mode, 1] = [r.text for r in results]
            rows.append({"mode": mode, "concurrency": 1, **summarize(results, wall), "identical_to_plain": None})
            print(_line(rows[-1]), file=sys.stderr, flush=True)
    for mode, lookahead in modes:
        for c in concurrencies:
            server = None if url else ServerProcess(model, lookahead, max_batch, out / f"{name}-{mode}-c{c}.log",
                                                    dtype, device, threads, server_args)
            base = url.rstrip("/").removesuffix("/v1") if url else server.url
            served = served_model_name or model
            try:
                asyncio.run(run_load(base, served, warmup, 1, 4))
                results, wall = asyncio.run(run_load(base, served, convs, c, max_tokens))
            finally:
                if server is not None:
                    server.close()
            texts[mode, c] = [r.text for r in results]
            row = {"mode": mode, "concurrency": c, **summarize(results, wall)}
            reference = texts.get(("generate-plain", 1)) or texts.get(("plain", min(concurrencies)))
            row["identical_to_plain"] = (sum(a == b for a, b in zip(texts[mode, c], reference))
                                         if reference is not None else None)
            rows.append(row)
            print(_line(row), file=sys.stderr, flush=True)
    for row in rows:  # the generate rows against the plain generate's texts too
        if row["identical_to_plain"] is None and ("generate-plain", 1) in texts and not url:
            row["identical_to_plain"] = sum(a == b for a, b in zip(texts[row["mode"], 1], texts["generate-plain", 1]))
    meta = {"model": model, "num_prompts": num_prompts, "max_tokens": max_tokens, "max_batch": max_batch,
            "threads": threads, "prompt_set": prompt_set, "server_args": list(server_args), "dtype": dtype, "date": time.strftime("%Y-%m-%d"), "results": rows,
            "requests": {f"{m}-c{c}": t for (m, c), t in texts.items()}}
    write_report(out, name, meta, markdown_table(rows),
                 plot(rows, f"{model}: {num_prompts} {prompt_set} prompts, {max_tokens} tokens"), dpi=120)
    return rows


def _line(row: dict) -> str:
    return (f"{row['mode']:>9s} c={row['concurrency']}: {row['requests_per_s']:.2f} req/s, "
            f"{row['output_tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
            f"TPOT p50 {row['tpot_p50_ms']:.0f} ms, {row['accepted_per_step']:.2f} tokens/step")


def markdown_table(rows: list[dict]) -> str:
    head = ("| mode | concurrency | requests | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) "
            "| TPOT p99 (ms) | accepted tokens/step | identical to plain |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        same = "-" if r["identical_to_plain"] is None else f"{r['identical_to_plain']}/{r['requests']}"
        errors = f" ({r['errors']} errors)" if r["errors"] else ""
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']}{errors} | {r['requests_per_s']:.2f} | "
                     f"{r['output_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
                     f"{r['tpot_p50_ms']:.1f} | {r['tpot_p99_ms']:.1f} | {r['accepted_per_step']:.2f} | {same} |")
    return "\n".join(lines)


def plot(rows: list[dict], title: str):
    """The figure of a load run: output tokens/s, TPOT and TTFT by concurrency, one line per mode."""
    def draw(plt):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        panels = [("output_tokens_per_s", "output tokens/s"), ("tpot_p50_ms", "time per output token p50 (ms)"),
                  ("ttft_p50_ms", "time to first token p50 (ms)")]
        for ax, (key, label) in zip(axes, panels):
            for mode in dict.fromkeys(r["mode"] for r in rows):
                mine = [r for r in rows if r["mode"] == mode]
                ax.plot([r["concurrency"] for r in mine], [r[key] for r in mine], marker="o", label=mode)
            ax.set_xticks(sorted({r["concurrency"] for r in rows}))
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(title)
        return fig
    return draw


# ---- the soak: memory over rounds of long prompts -----------------------------------------------------------------
SOAK_QUESTIONS = ("What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
                  "Who wrote Romeo and Juliet?")  # greedy answers compared before the first and after the last round
CHARS_PER_TOKEN = 4  # a long prompt of N tokens is cut at about 4N characters of English


def long_conversations(count: int, prompt_tokens: int, start: int) -> tuple[list[list[dict]], int]:
    """`count` distinct summarisation prompts of about `prompt_tokens` tokens, each Spec-Bench first turns joined
    from index `start` on -> (conversations, the next unused index)."""
    from lookahead.data import spec_bench_first_turns

    texts = [t for _, t in spec_bench_first_turns(None)]
    convs, i = [], start
    for _ in range(count):
        parts: list[str] = []
        while sum(len(p) for p in parts) < CHARS_PER_TOKEN * prompt_tokens:
            parts.append(texts[i % len(texts)])
            i += 1
        body = "\n\n".join(parts)[:CHARS_PER_TOKEN * prompt_tokens]
        convs.append([{"role": "user", "content": "Summarise the following in one sentence.\n\n" + body}])
    return convs, i


def soak(model: str = DEFAULT_MODEL, rounds: int = 8, num_prompts: int = 40, prompt_tokens: int = 1500,
         max_tokens: int = 32, concurrency: int = 16, out: str | Path = "bench/serve", name: str = "soak",
         max_batch: int = 16, dtype: str | None = None, device: str | None = None, threads: int | None = None,
         extra: tuple[str, ...] = ()) -> dict:
    """One lookahead server; `rounds` rounds of `num_prompts` distinct long prompts at `concurrency`; memory by
    part (GET /v1/stats) when idle and after each round; the greedy answers to SOAK_QUESTIONS before and after.
    Writes `{out}/{name}.json`, `.md` and `.png` and returns the record."""
    import httpx

    if min(rounds, num_prompts, prompt_tokens, max_tokens, concurrency) < 1:
        raise ValueError("rounds, num_prompts, prompt_tokens, max_tokens and concurrency must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(model, True, max_batch, out / f"{name}.log", dtype, device, threads, extra)
    questions = [[{"role": "user", "content": q}] for q in SOAK_QUESTIONS]

    def snapshot(label: str, **more) -> dict:
        time.sleep(1.0)  # the decode thread trims the allocator when the last request has left
        stats = httpx.get(server.url + "/v1/stats", timeout=60).json()
        row = {"round": label, **stats["memory_bytes"], "trie_nodes": stats["trie_nodes"], **more}
        print(f"soak {label}: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in stats["memory_bytes"].items())
              + f", trie {stats['trie_nodes']} nodes", file=sys.stderr, flush=True)
        return row

    def trie_peak(stop: threading.Event, peak: dict) -> None:
        """The trie's largest size while a round runs (request-local prompt windows included), polled 4x a second."""
        while not stop.wait(0.25):
            stats = httpx.get(server.url + "/v1/stats", timeout=60).json()
            peak["trie_peak_nodes"] = max(peak["trie_peak_nodes"], stats["trie_nodes"])
            peak["trie_peak"] = max(peak["trie_peak"], stats["memory_bytes"]["trie"])

    try:
        before, _ = asyncio.run(run_load(server.url, model, questions, 1, 24))
        rows = [snapshot("idle")]
        start = 0
        for r in range(1, rounds + 1):
            convs, start = long_conversations(num_prompts, prompt_tokens, start)
            stop, peak = threading.Event(), {"trie_peak_nodes": 0, "trie_peak": 0}
            watcher = threading.Thread(target=trie_peak, args=(stop, peak), daemon=True)
            watcher.start()
            try:
                results, wall = asyncio.run(run_load(server.url, model, convs, concurrency, max_tokens))
            finally:
                stop.set()
                watcher.join()
            rows.append(snapshot(str(r), errors=sum(x.error is not None for x in results), wall_s=wall, **peak))
        after, _ = asyncio.run(run_load(server.url, model, questions, 1, 24))
    finally:
        server.close()
    record = {"model": model, "rounds": rounds, "num_prompts": num_prompts, "prompt_tokens": prompt_tokens,
              "max_tokens": max_tokens, "concurrency": concurrency, "max_batch": max_batch, "server_args": list(extra),
              "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows,
              "answers_unchanged": [a.text == b.text for a, b in zip(before, after)],
              "failed": sum(row.get("errors", 0) for row in rows)}
    write_report(out, name, record, soak_table(rows),
                 soak_plot(rows, f"{model}: {rounds} rounds x {num_prompts} prompts of ~{prompt_tokens} tokens, "
                                 f"c={concurrency}"), dpi=120)
    return record


SOAK_PARTS = ("weights", "kv_cache", "trie", "suffix_automata", "workspace")


def soak_table(rows: list[dict]) -> str:
    head = "| round | RSS (MiB) | peak RSS so far (MiB) | " + " | ".join(f"{p} (MiB)" for p in SOAK_PARTS) + \
        " | trie nodes | trie peak in the round (nodes, MiB) | failed |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        parts = " | ".join(f"{r[p] / 2**20:.0f}" for p in SOAK_PARTS)
        peak = f"{r['trie_peak_nodes']}, {r['trie_peak'] / 2**20:.1f}" if "trie_peak" in r else "-"
        lines.append(f"| {r['round']} | {r['rss'] / 2**20:.0f} | {r['rss_peak'] / 2**20:.0f} | {parts} | "
                     f"{r['trie_nodes']} | {peak} | {r.get('errors', '-')} |")
    return "\n".join(lines)


def soak_plot(rows: list[dict], title: str):
    """The figure of a soak run: memory by part after each round, with the RSS and its peak."""
    def draw(plt):
        fig, ax = plt.subplots(figsize=(8, 4))
        x = list(range(len(rows)))
        ax.stackplot(x, *[[r[p] / 2**20 for r in rows] for p in SOAK_PARTS], labels=SOAK_PARTS, alpha=0.6)
        ax.plot(x, [r["rss"] / 2**20 for r in rows], "k-o", label="RSS")
        ax.plot(x, [r["rss_peak"] / 2**20 for r in rows], "k--", label="peak RSS so far")
        ax.set_xticks(x, [r["round"] for r in rows])
        ax.set_xlabel("after round")
        ax.set_ylabel("MiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(title, fontsize=9)
        return fig
    return draw


def add_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF checkpoint dir, .gguf file, or smollm2-135m-instruct")
    p.add_argument("--url", default=None, help="bench this running server instead of starting plain and lookahead ones")
    p.add_argument("--served-model-name", default=None, help="the model id the server at --url expects")
    p.add_argument("--num-prompts", type=int, default=8, help="Spec-Bench first turns, round-robin over categories")
    p.add_argument("--set", dest="prompt_set", choices=["spec-bench", "copy-heavy"], default="spec-bench",
                   help="copy-heavy: only Spec-Bench's rag, summarization and extraction prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--max-batch", type=int, default=16, help="--max-batch of the servers started")
    p.add_argument("--threads", type=int, default=None, help="--threads of the servers and of the generate() run")
    p.add_argument("--no-baseline", action="store_true", help="skip the generate() runs on the same prompts")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=Path("bench/serve"))
    p.add_argument("--name", default=None, help="file name stem of the JSON, Markdown and PNG (serve / soak)")
    p.add_argument("--soak", type=int, default=None, metavar="ROUNDS",
                   help="instead: one lookahead server, ROUNDS rounds of --num-prompts distinct long prompts of "
                        "--prompt-tokens at the first --concurrency; memory by part per round")
    p.add_argument("--prompt-tokens", type=int, default=1500, help="with --soak: tokens per long prompt (about)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="with --soak: pass ARG to the server (repeatable, e.g. --server-arg=--no-malloc-trim)")


def run(args) -> int:
    if args.soak is not None:
        record = soak(args.model, args.soak, args.num_prompts, args.prompt_tokens, args.max_tokens,
                      args.concurrency[0], args.out, args.name or "soak", args.max_batch, args.dtype, args.device,
                      args.threads, tuple(args.server_arg))
        print(soak_table(record["rows"]))
        return 0 if record["failed"] == 0 and all(record["answers_unchanged"]) else 1
    rows = bench_serve(args.model, args.num_prompts, args.max_tokens, tuple(args.concurrency), args.out,
                       args.name or "serve",
                       args.max_batch, args.url, args.served_model_name, args.dtype, args.device, args.threads,
                       not args.no_baseline, args.prompt_set, tuple(args.server_arg))
    print(markdown_table(rows))
    return 0 if all(r["errors"] == 0 for r in rows) else 1
