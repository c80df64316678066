"""Issue 37's experiment against a live `lookahead serve`: does what one client asked show in another's speed?

    python -m lookahead.benchmarks.tenants_bench --serve [--questions 16] [--max-tokens 64] [--control]
    python -m lookahead.benchmarks.tenants_bench --url http://127.0.0.1:8000 --victim-key A --attacker-key B

A "victim" key asks questions; an "attacker" key then asks the same questions and as many that nobody asked,
alternately; the victim asks its questions again (history within a tenant still drafts); then the same under one
key with two `cache_salt`s. Questions are Spec-Bench first turns of the short-prompt categories, dealt to the asked
and the never-asked set so that both cover the same categories (`questions`). Every request is greedy and streamed;
per request: `usage.lookahead`'s accepted tokens/step and the decode time per token after the first. Each comparison
is a two-sided permutation test on the difference of means (`permutation_p`) and the relative difference of the
means.

`--serve` serves the model itself (the server's app and scheduler in this process, HTTP on a free loopback port)
with two keys, twice, each time fresh: the second time the two question sets trade roles (counterbalanced:
`merge`), so both sides of each comparison hold the same questions. Drafting is fixed (`adaptive=False`,
`--decoding-length`): the drafting gate would follow this machine's timings, and on a loaded CPU it turns drafting
off, where no history shows at all. `--control` also runs it with one key, today's shared trie, where the leak
shows. Prints a Markdown table and the tests; --json writes them. docs/tenants.md holds the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Spec-Bench's categories with short prompts: the answers are the model's own, not copies of a long prompt.
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "stem", "humanities", "translation", "qa",
              "math_reasoning")
MODEL = "smollm2-135m-instruct"
PERMUTATIONS = 20_000


@dataclass
class Answer:
    accepted_per_step: float   # usage.lookahead.accepted_tokens_per_step
    decode_ms_per_token: float  # from the first streamed text to the end, per token after the first
    completion_tokens: int
    text: str


def questions(n: int) -> tuple[list[str], list[str]]:
    """2n Spec-Bench first turns round-robin over CATEGORIES -> (asked, never asked), n each, dealt so that every
    category gives both sides alike: turn i (category i % C, round i // C) is asked when (round + category) is even.
    (Dealing every other turn would give each side the same half of the categories, whose answers differ.)"""
    from lookahead.data import spec_bench_first_turns

    turns = [text for _, text in spec_bench_first_turns(None, list(CATEGORIES))][:2 * n]
    if len(turns) < 2 * n:
        raise ValueError(f"Spec-Bench has {len(turns)} questions in {CATEGORIES}, {2 * n} were asked for")
    c = len(CATEGORIES)
    asked = [t for i, t in enumerate(turns) if (i // c + i % c) % 2 == 0]
    never = [t for i, t in enumerate(turns) if (i // c + i % c) % 2 == 1]
    return asked[:n], never[:n]


def ask(url: str, key: str | None, question: str, max_tokens: int, salt: str | None = None, model: str = MODEL,
        timeout: float = 300.0) -> Answer:
    """One greedy streamed chat request -> its acceptance and decode time (RuntimeError for an HTTP error)."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if salt is not None:
        body["cache_salt"] = salt
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    first = last = None
    pieces, usage = [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", ()):
                text = choice.get("delta", {}).get("content")
                if text:
                    last = time.perf_counter()
                    first = first or last
                    pieces.append(text)
    if usage is None:
        raise RuntimeError("the stream carried no usage")
    tokens = usage["completion_tokens"]
    decode = (last - first) / (tokens - 1) * 1e3 if first is not None and tokens > 1 else float("nan")
    return Answer(usage["lookahead"]["accepted_tokens_per_step"], decode, tokens, "".join(pieces))


def permutation_p(a: list[float], b: list[float], rounds: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided permutation test of mean(a) == mean(b): the share of random relabelings of a + b whose difference
    of means is at least the observed one (add-one, so never 0). Seeded: the same data give the same p."""
    a, b = [x for x in a if x == x], [x for x in b if x == x]  # NaN (a one-token answer's decode time) dropped
    if not a or not b:
        raise ValueError("permutation_p needs at least one value on each side")
    observed = abs(sum(a) / len(a) - sum(b) / len(b))
    pooled, rng, hits = a + b, random.Random(seed), 0
    for _ in range(rounds):
        rng.shuffle(pooled)
        x, y = pooled[:len(a)], pooled[len(a):]
        hits += abs(sum(x) / len(x) - sum(y) / len(y)) >= observed - 1e-12
    return (hits + 1) / (rounds + 1)


def compare(a: list[float], b: list[float]) -> dict:
    """Means, their relative difference (to b's mean) and the permutation test's p."""
    a_ok, b_ok = [x for x in a if x == x], [x for x in b if x == x]
    mean_a, mean_b = sum(a_ok) / len(a_ok), sum(b_ok) / len(b_ok)
    return {"mean_a": mean_a, "mean_b": mean_b, "relative_difference": (mean_a - mean_b) / mean_b,
            "p": permutation_p(a_ok, b_ok)}


def experiment(url: str, victim_key: str | None, attacker_key: str | None, n: int = 16, max_tokens: int = 64,
               salts: bool = True, model: str = MODEL, log=print, swap: bool = False) -> dict[str, list[Answer]]:
    """The phases on a fresh server, in order -> {phase: answers}: victim asks; attacker asks the victim's and
    never-asked questions alternately; victim repeats; (salts) under the victim's key salt "x" asks, salt "y" asks
    x's questions and never-asked ones alternately, salt "x" repeats. swap: the two question sets trade roles (the
    second half of a counterbalanced run, `merge`)."""
    asked, never = questions(n)
    if swap:
        asked, never = never, asked
    out: dict[str, list[Answer]] = {}

    def run(phase: str, key, items, salt=None):
        for question in items:
            out.setdefault(phase, []).append(ask(url, key, question, max_tokens, salt, model))
        log(f"{phase}: {len(items)} requests, accepted/step "
            f"{sum(a.accepted_per_step for a in out[phase]) / len(out[phase]):.2f}")

    def alternately(prefix: str, key, salt=None):
        for question, other in zip(asked, never):
            out.setdefault(f"{prefix}: asked by another", []).append(ask(url, key, question, max_tokens, salt, model))
            out.setdefault(f"{prefix}: never asked", []).append(ask(url, key, other, max_tokens, salt, model))
        for phase in (f"{prefix}: asked by another", f"{prefix}: never asked"):
            log(f"{phase}: accepted/step {sum(a.accepted_per_step for a in out[phase]) / len(out[phase]):.2f}")

    run("victim: first ask", victim_key, asked)
    alternately("attacker", attacker_key)
    run("victim: repeats", victim_key, asked)
    if salts:
        run("salt x: first ask", victim_key, asked, salt="x")
        alternately("salt y", victim_key, salt="y")
        run("salt x: repeats", victim_key, asked, salt="x")
    return out


def merge(*runs: dict[str, list[Answer]]) -> dict[str, list[Answer]]:
    """Counterbalanced runs (`experiment` with swap False, then True, each on a fresh server) as one: every question
    is then asked by another once and never asked once, so the two sides hold the same questions and differ only in
    whether another tenant asked them first (questions' own acceptance differs by 30% between two random sets of
    ten)."""
    out: dict[str, list[Answer]] = {}
    for run in runs:
        for phase, answers in run.items():
            out.setdefault(phase, []).extend(answers)
    return out


def report(phases: dict[str, list[Answer]]) -> tuple[str, dict]:
    """A Markdown table of the phases and the tests: across tenants / salts (asked by another vs never asked) and
    within one (repeats vs first asks)."""
    lines = ["| phase | requests | accepted tokens/step (mean) | decode ms/token (mean) |", "|---|---|---|---|"]
    for phase, answers in phases.items():
        acc = [a.accepted_per_step for a in answers]
        ms = [a.decode_ms_per_token for a in answers if a.decode_ms_per_token == a.decode_ms_per_token]
        lines.append(f"| {phase} | {len(answers)} | {sum(acc) / len(acc):.2f} | "
                     f"{sum(ms) / max(len(ms), 1):.1f} |")
    pairs = [("attacker: asked by another", "attacker: never asked"),
             ("attacker: asked by another", "victim: first ask"), ("victim: repeats", "victim: first ask"),
             ("salt y: asked by another", "salt y: never asked"), ("salt y: asked by another", "salt x: first ask"),
             ("salt x: repeats", "salt x: first ask")]
    tests = {}
    lines += ["", "| comparison (a vs b) | measure | mean a | mean b | (a - b) / b | permutation p |",
              "|---|---|---|---|---|---|"]
    for a, b in pairs:
        if a not in phases or b not in phases:
            continue
        for measure in ("accepted_per_step", "decode_ms_per_token"):
            result = compare([getattr(x, measure) for x in phases[a]], [getattr(x, measure) for x in phases[b]])
            tests[f"{a} vs {b}: {measure}"] = result
            lines.append(f"| {a} vs {b} | {measure} | {result['mean_a']:.2f} | {result['mean_b']:.2f} | "
                         f"{100 * result['relative_difference']:+.1f}% | {result['p']:.3f} |")
    return "\n".join(lines), tests


def _serve(model, tokenizer, name: str, keys: dict[str, str], decoding_length: int):
    """The server's app and scheduler over `model` with an empty trie and no pools, on a free loopback port."""
    from lookahead.config import LookaheadConfig
    from lookahead.serve.app import BackgroundServer
    from lookahead.serve.scheduler import Scheduler
    from lookahead.engine.state import GenerationState

    saved = model.state
    model.state = GenerationState(cost_curves=dict(saved.cost_curves), step_costs=saved.step_costs)
    scheduler = Scheduler(model, max_batch=1, max_context=1024, metrics=True,
                          lookahead=LookaheadConfig(adaptive=False, decoding_length=decoding_length))
    return BackgroundServer(scheduler, tokenizer, name, api_keys=keys)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lookahead.benchmarks.tenants_bench", description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: --serve starts one)")
    p.add_argument("--victim-key", default=None)
    p.add_argument("--attacker-key", default=None)
    p.add_argument("--serve", action="store_true", help="serve the model on loopback with two keys, in this process")
    p.add_argument("--decoding-length", type=int, default=12, help="with --serve: draft nodes per step (fixed)")
    p.add_argument("--control", action="store_true",
                   help="with --serve: also run it on a one-key server (today's shared trie: the leak)")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--dtype", default="fp32", help="with --serve: auto, fp32, bf16 or fp16")
    p.add_argument("--questions", type=int, default=16, help="questions on each side (asked / never asked)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-salts", action="store_true", help="skip the cache_salt phases")
    p.add_argument("--once", action="store_true",
                   help="one run, not two counterbalanced ones (the sets' own difference then shows as one)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if (args.url is None) == (not args.serve):
        p.error("give --url (a running server) or --serve (start one)")
    results = {}
    if args.url:
        runs = [("as given", args.url, args.victim_key, args.attacker_key)]
    else:
        runs = [("two keys", {"victim": "victim-secret", "attacker": "attacker-secret"}, "victim-secret",
                 "attacker-secret")]
        if args.control:
            runs.append(("one key (control)", {"shared": "shared-secret"}, "shared-secret", "shared-secret"))
    from lookahead.kernels.cpu import cpu_name

    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_name()}, {args.questions} questions a side, "
          f"max_tokens {args.max_tokens}, greedy" + (f"; served here: {args.model} {args.dtype}, drafting fixed at "
                                                     f"{args.decoding_length} nodes" if args.serve else ""))
    model = tokenizer = None
    if args.serve:
        from lookahead.models.auto import load_model

        model, tokenizer = load_model(args.model, args.dtype, "cpu")
    for label, where, victim, attacker in runs:
        halves = []
        for swap in (False,) if args.once or args.url else (False, True):  # a fresh server each (--serve)
            server = None
            if not isinstance(where, str):
                server = _serve(model, tokenizer, args.model, where, args.decoding_length)
                url = server.url
            else:
                url = where
            try:
                salts = not args.no_salts and victim != attacker  # one key: the control shows the shared trie
                halves.append(experiment(url, victim, attacker, args.questions, args.max_tokens, salts,
                                         args.model, log=lambda line: print("  " + line, file=sys.stderr), swap=swap))
            finally:
                if server is not None:
                    server.close()
        phases = merge(*halves)
        table, tests = report(phases)
        print(f"\n### {label}\n\n{table}")
        results[label] = {"phases": {k: [asdict(a) for a in v] for k, v in phases.items()}, "tests": tests}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
