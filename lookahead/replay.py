"""`lookahead replay`: judge drafters without the model.

For greedy decoding the tokens a step accepts depend only on the draft and on the model's own continuation,
so a model's recorded greedy outputs replay any drafter exactly: `record` stores, per prompt, the prompt ids,
the greedy output and the model's top-k next tokens at every output position (teacher-forced, for the
model-recycled branches); `replay` feeds the recording through the real `Drafter` and reports accepted
tokens/step, draft nodes/step and the speedup over plain decoding that a verify cost curve models.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from lookahead.config import LookaheadConfig
from lookahead.cost import CostModel
from lookahead.draft import bucket_size
from lookahead.drafter import Drafter

FORMAT = "lookahead-replay"
VERSION = 1
SHIPPED = Path(__file__).resolve().parent / "data" / "replay" / "smollm2_spec_bench.jsonl.gz"


def _open(path: Path, mode: str, compressed: bool | None = None):
    if compressed is None:
        compressed = str(path).endswith(".gz")
    return gzip.open(path, mode + "t") if compressed else open(path, mode)


def record(model, tokenizer, prompts: list[tuple[str, str]], path: str | Path, max_new_tokens: int = 128,
           top_k: int = 8, chat: bool = True, progress: bool = True) -> None:
    """Greedy outputs of `model` for (category, text) prompts, with the teacher-forced top-k next tokens at every
    output position, written to `path` (JSONL, gzip when it ends in .gz): a header line, then one line per
    prompt {category, prompt_ids, output_ids, topk} where topk[j] is the model's top-k after the token before
    output_ids[j] (so topk[j][0] is output_ids[j] up to fp32 rounding)."""
    import torch
    from tqdm import tqdm

    from lookahead.data import encode_prompt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _open(tmp, "w", compressed=path.suffix == ".gz") as f, torch.inference_mode():
        header = {"format": FORMAT, "version": VERSION, "model": model.name_or_path, "dtype": str(model.dtype),
                  "max_new_tokens": max_new_tokens, "top_k": top_k, "chat": chat, "date": date.today().isoformat()}
        f.write(json.dumps(header) + "\n")
        for category, text in tqdm(prompts, desc="record", disable=not progress):
            ids = encode_prompt(tokenizer, text, chat).to(model.device)
            seq = model.generate(ids, max_new_tokens=max_new_tokens, lookahead=True)
            n = ids.shape[1]
            logits = model(seq[:, :-1]).logits[0, n - 1:]  # (new, V): the prediction of each output token
            topk = logits.topk(top_k, dim=-1).indices.tolist()
            f.write(json.dumps({"category": category, "prompt_ids": ids[0].tolist(),
                                "output_ids": seq[0, n:].tolist(), "topk": topk}, separators=(",", ":")) + "\n")
    tmp.replace(path)


def load_recording(path: str | Path = SHIPPED) -> tuple[dict, list[dict]]:
    """(header, records) of a file written by `record`; a damaged or foreign file raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recording at {path}: make one with `lookahead replay record`")
    try:
        with _open(path, "r") as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not a lookahead replay recording: {e}") from None
    if not lines or lines[0].get("format") != FORMAT or lines[0].get("version") != VERSION:
        raise ValueError(f"{path} is not a lookahead replay recording (format {FORMAT!r} version {VERSION})")
    return lines[0], lines[1:]


# Relative verify cost curves to model speedups with (cost of a verify over T tree nodes / cost of one token).
# cpu-smollm2: SmolLM2-135M fp32 on this project's 2-core CPU (the drafter issue's curve, 2026-11-24);
# h100-7b: the Llama-2-7B shape in bf16 on an H100, graph replays (bench/gpu/gpu_e2e_h100.md, 2026-11-24).
CURVES = {
    "cpu-smollm2": {1: 1.0, 8: 1.13, 16: 1.37, 32: 1.97, 64: 3.2},
    "h100-7b": {1: 1.0, 2: 1.069, 4: 1.08, 8: 1.171, 16: 1.215, 32: 1.228, 64: 1.273, 128: 1.38},
}


@dataclass
class ReplayTotals:
    """One group of replayed requests: decode steps (the prefill excluded), tokens they produced, draft nodes
    they verified, and their modeled cost (sum of relative verify costs of the padded trees)."""
    requests: int = 0
    steps: int = 0
    tokens: int = 0
    draft_nodes: int = 0
    cost: float = 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(self.steps, 1)

    @property
    def draft_nodes_per_step(self) -> float:
        return self.draft_nodes / max(self.steps, 1)

    @property
    def speedup(self) -> float:
        """Plain decoding's cost (one unit per token) over lookahead's modeled cost."""
        return self.tokens / self.cost if self.cost else 1.0

    def add(self, other: "ReplayTotals") -> None:
        for name in ("requests", "steps", "tokens", "draft_nodes", "cost"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return {"requests": self.requests, "steps": self.steps, "tokens": self.tokens,
                "tokens_per_step": self.tokens_per_step, "draft_nodes_per_step": self.draft_nodes_per_step,
                "modeled_speedup": self.speedup}


def replay_request(drafter: Drafter, request_id: int, record: dict, cost: CostModel, recycle: bool = True,
                   references: Sequence[Sequence[int]] = ()) -> ReplayTotals:
    """One recorded request through `drafter`, exactly as generate would run it for greedy decoding: the
    accepted tokens of a step are the longest draft path that matches the recorded output, plus the bonus."""
    prompt, output, topk = record["prompt_ids"], record["output_ids"], record["topk"]
    totals = ReplayTotals(requests=1)
    drafter.begin_request(request_id, prompt, references)
    try:
        drafter.update(request_id, output[:1])  # the prefill's token
        context = list(prompt) + output[:1]
        pos = 1
        while pos < len(output):
            tokens, parents = drafter.draft(request_id, context)
            depth = [0] * (len(tokens) + 1)
            correct = [True] + [False] * len(tokens)
            accepted = 0
            for i, (tok, par) in enumerate(zip(tokens, parents), start=1):
                depth[i] = depth[par] + 1
                d = depth[i]
                correct[i] = correct[par] and pos + d - 1 < len(output) and output[pos + d - 1] == tok
                if correct[i]:
                    accepted = max(accepted, d)
            new = output[pos:pos + accepted + 1]
            predictions = None
            if recycle:  # the root's and the accepted nodes' top-k, as the verify logits give them
                predictions = {output[pos - 1 + d]: topk[pos + d] for d in range(accepted + 1)
                               if pos + d < len(topk)}
            drafter.update(request_id, new, predictions)
            context += new
            pos += len(new)
            totals.steps += 1
            totals.tokens += len(new)
            totals.draft_nodes += len(tokens)
            totals.cost += cost(bucket_size(len(tokens) + 1))
    finally:
        drafter.end_request(request_id)
    return totals


def replay(records: list[dict], config: LookaheadConfig, curve: Mapping[int, float], warm: bool = True,
           recycle: bool = True, policy: bool = True) -> dict[str, ReplayTotals]:
    """Replay recorded requests in file order: warm keeps one drafter (trie, calibration, recycled tokens) across
    them, cold starts each request from a fresh one. policy=False drafts decoding_length nodes every step.
    Returns totals per category and "ALL"."""
    cost = CostModel(curve)
    groups: dict[str, ReplayTotals] = defaultdict(ReplayTotals)
    drafter = None
    for i, rec in enumerate(records):
        if drafter is None or not warm:
            drafter = Drafter(config, cost_curve=curve if policy else None)
        totals = replay_request(drafter, i, rec, cost, recycle=recycle)
        groups[rec.get("category", "all")].add(totals)
    everything = ReplayTotals()
    for t in groups.values():
        everything.add(t)
    return {**groups, "ALL": everything}


def markdown(results: dict[str, dict[str, ReplayTotals]]) -> str:
    """results: {label: replay() output} -> one table, a row per category, a column group per label."""
    labels = list(results)
    cats = list(next(iter(results.values())))
    head = ["category"] + [f"{lab} {col}" for lab in labels for col in ("tok/step", "nodes/step", "speedup")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cats:
        cells = [c]
        for lab in labels:
            t = results[lab][c]
            cells += [f"{t.tokens_per_step:.2f}", f"{t.draft_nodes_per_step:.1f}", f"{t.speedup:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(p) -> None:
    from lookahead.models.auto import DTYPES

    sub = p.add_subparsers(dest="replay_command", required=True)
    r = sub.add_parser("record", help="record a model's greedy outputs (and top-k) on Spec-Bench prompts")
    r.add_argument("--model", default="smollm2-135m-instruct")
    r.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    r.add_argument("--device", default=None)
    r.add_argument("--per-category", type=int, default=8)
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--top-k", type=int, default=8)
    r.add_argument("--out", type=Path, required=True)
    r.set_defaults(func=_cmd_record)
    s = sub.add_parser("run", help="replay a recording through the drafter: tokens/step, nodes/step, modeled speedup")
    s.add_argument("--recording", type=Path, default=SHIPPED)
    s.add_argument("--curve", default="cpu-smollm2",
                   help=f"one of {sorted(CURVES)}, 'measured' (this machine's, for the recorded model) or a JSON file")
    s.add_argument("--cold", action="store_true", help="a fresh drafter per request (default: warm, file order)")
    s.add_argument("--no-recycle", action="store_true", help="no model-recycled branches")
    s.add_argument("--no-policy", action="store_true", help="draft decoding_length nodes every step")
    s.add_argument("--decoding-length", type=int, default=None)
    s.add_argument("--branch-length", type=int, default=None)
    s.add_argument("--max-query-length", type=int, default=None)
    s.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    s.set_defaults(func=_cmd_replay)


def run(args) -> int:
    return args.func(args)


def _cmd_record(args) -> int:
    from lookahead.data import spec_bench_first_turns
    from lookahead.models.auto import load_model

    model, tokenizer = load_model(args.model, args.dtype, args.device)
    record(model, tokenizer, spec_bench_first_turns(args.per_category), args.out, args.max_new_tokens, args.top_k)
    return 0


def _curve(name: str, header: dict) -> dict[int, float]:
    if name in CURVES:
        return CURVES[name]
    if name == "measured":
        from lookahead.cost import calibrate
        from lookahead.models.auto import load_model

        model, _ = load_model(header.get("model") or "smollm2-135m-instruct", None, "cpu")
        return calibrate(model, 128)
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no cost curve {name!r}: give one of {sorted(CURVES)}, 'measured' or a JSON file")
    try:
        return {int(T): float(c) for T, c in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a cost curve JSON {{tree nodes: cost}}: {e}") from None


def _cmd_replay(args) -> int:
    header, records = load_recording(args.recording)
    curve = _curve(args.curve, header)
    overrides = {k: v for k, v in (("decoding_length", args.decoding_length), ("branch_length", args.branch_length),
                                   ("max_query_length", args.max_query_length)) if v is not None}
    config = LookaheadConfig(**overrides)
    results = {"cold" if args.cold else "warm": replay(records, config, curve, warm=not args.cold,
                                                        recycle=not args.no_recycle, policy=not args.no_policy)}
    print(f"{args.recording.name}: {len(records)} requests, curve {args.curve}, {config}")
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps({k: {c: t.as_dict() for c, t in v.items()} for k, v in results.items()},
                                        indent=1))
    return 0
