"""The engine: the one step runner behind `generate` and `lookahead serve`.

An `Engine` owns a static KV cache of `max_batch` rows, the per-row state of the requests in them (`Sequence`),
one batched `TokenChooser`, a persistent device step mask, the CUDA graphs of its steps, the drafter and the
learned cost model of its steps. `add` prefills requests into free rows; `step` runs one decode step over rows
[0, last busy row] and commits every row's accepted tokens; `remove` ends a request early. `generate` adds its
rows and steps until they end; the server admits, cancels and evicts requests around the same calls.

Per step: draft (the Drafter prices every row's tree in one ragged step with `StepCost`) -> pack (`pack_ragged`:
each row's tokens flattened, no padding to the longest row; prompt chunks of rows still prefilling ride in the
same step) -> one device step (`verify_step`; on CUDA a decode-only step is padded to a bucket and replayed as a
CUDA graph) -> one device-to-host read -> commit per row (eos / stop strings / max tokens cut,
sampler and drafter updates). Host work is O(draft size + prompt chunk) per row; the step's seconds are fed back
into the cost model. Rows never see each other: the linear layers are batch-invariant on the CPU path and
attention is per row, so a greedy request returns the tokens it would return alone.

Prefill on CPU is the same step: a prompt is a causal chain of tokens verified in chunks (tree attention over the
key sequence makes a chunk's bits independent of where chunks end), its last token the root of the row's first
tree. `add(defer=False)` (generate) runs such steps for the new rows at once; `add(defer=True)` (the server) lets
each later `step` carry at most `prefill_chunk` prompt tokens beside the running rows' trees (vLLM v1's chunked
prefill), so a new request neither waits for nor stalls the others. On CUDA the prefill is `model.prefill`
(flash-attn or sdpa) at `add`.

All torch work of an engine happens on the thread that calls it (torch's OpenMP pool is per thread).
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Hashable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from lookahead.config import MAX_TREE_NODES, LookaheadConfig, draft_gate_enabled
from lookahead.drafting.drafter import Drafter
from lookahead.drafting.drafter import StepCost, StepPrice
from lookahead.drafting.proposer import Proposer
from lookahead.drafting.tree import DraftTree, bucket_size, pack_ragged, trees_of_batch
from lookahead.engine.pricing import DraftGate, curve_key, prior_curve
from lookahead.engine.sampling import SamplingParams, TokenChooser
from lookahead.engine.step import StepGraphs, graphs_enabled, nvtx_range, verify_step
from lookahead.models.cache import KVCache

log = logging.getLogger("lookahead.engine.engine")

# A padded prefill forward takes rows together only while padding stays under this share of its tokens (one
# padded forward of 16 prompts delayed every first token): docs/benchmarks.md#prefill_max_padding
PREFILL_MAX_PADDING = 0.25

# Tokens of one prefill forward, all its rows together (at least one per row): longer prompts go in chunks, so a
# wave of long prompts cannot raise the activations' high-water mark; the size that prefilled fastest at a flat
# peak: docs/benchmarks.md#prefill_chunk_tokens
PREFILL_CHUNK_TOKENS = 1024

_request_ids = itertools.count()


class ContextTooLong(ValueError):
    """A prompt plus its max_new_tokens do not fit a row (the server answers context_length_exceeded)."""

    __module__ = "lookahead.engine"  # its public name (docs/API.md), as tracebacks print it


class StopStrings:
    """transformers' stop_strings: the output ends with the token that completes any of the strings. generate's
    engine cuts rows with it; the server's text stream (`serve/app.py`, `TextStream`) finds stop strings in its own
    incremental text and uses `first_stop` to count the tokens up to the one that completed it. decode: how token
    ids read as text (default `tokenizer.decode`)."""

    def __init__(self, strings, tokenizer, decode=None):
        if isinstance(strings, str):
            strings = [strings]
        if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop_strings must be a non-empty string or list of non-empty strings, got {strings!r}")
        if tokenizer is None:
            raise ValueError("stop_strings need tokenizer=... to read the generated text (as in transformers)")
        self.strings, self.tokenizer = list(strings), tokenizer
        self.decode = decode if decode is not None else tokenizer.decode
        # a stop string of n characters lies within the last n + 4 tokens: a token decodes to >= 1 character
        # except special or partial-UTF-8 tokens, for which the slack is kept generous
        self.window = max(len(s) for s in self.strings) + 4

    def first_stop(self, output: list[int], new: list[int]) -> int | None:
        """Index j of the first token of `new` whose text completes a stop string after `output`, else None. One
        decode per call when no string is there (the usual step); the token is searched only on a hit."""
        tokens = output[-self.window:] + new
        if not new or not any(s in self.decode(tokens) for s in self.strings):
            return None  # every window below is a part of this text
        offset = len(tokens) - len(new)
        for j in range(len(new)):
            text = self.decode(tokens[max(0, offset + j + 1 - self.window):offset + j + 1])
            if any(s in text for s in self.strings):
                return j
        return None


def cut_new_tokens(new: list[int], context: list[int], prompt_len: int, max_new_tokens: int, eos,
                   stops: StopStrings | None) -> tuple[list[int], str | None]:
    """A row's accepted tokens cut at max_new_tokens, the first eos, or the token that completes a stop string:
    (kept, None while the row goes on, else "length" or "stop"). O(new tokens): the context is never copied."""
    room = max_new_tokens - (len(context) - prompt_len)
    new, ended = new[:room], ("length" if len(new) >= room else None)
    for j, t in enumerate(new):
        if t in eos:
            return new[:j + 1], "stop"
    if stops is not None:
        j = stops.first_stop(context[max(prompt_len, len(context) - stops.window):], new)
        if j is not None:
            return new[:j + 1], "stop"
    return new, ended


@dataclass(eq=False)
class Sequence:
    """One request in an engine: its settings, its committed tokens and its counts. noise_row: the row id its
    sampling noise is keyed by (generate: the row's index in its batch; the server: 0, as a solo call), so a
    seeded request's tokens never depend on the slot it got."""
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos: frozenset[int] = frozenset()
    stops: StopStrings | None = None
    references: Seq[Seq[int]] = ()
    noise_row: int = 0
    request_id: int = field(default_factory=lambda: next(_request_ids))
    pool: Hashable | None = None  # its drafting pool (`Drafter.begin_request`; None: the shared trie)
    context: list[int] = field(init=False)  # prompt + output so far
    row: int | None = field(default=None, init=False)
    prefilled: int = field(default=0, init=False)  # prompt tokens whose K/V are in its row
    steps: int = field(default=0, init=False)         # forward passes that produced its tokens (prefill included)
    draft_tokens: int = field(default=0, init=False)  # draft nodes verified for it
    finish_reason: str | None = field(default=None, init=False)  # "stop", "length", or what remove() was told
    error: str | None = field(default=None, init=False)  # why a step failed it (finish_reason "error")

    def __post_init__(self):
        self.context = list(self.prompt)

    def check(self, vocab: int, max_context: int, where: str = "this engine's rows") -> None:
        """The one admission check (generate, the engine, the server): ValueError unless the prompt is a non-empty
        list of token ids in [0, vocab) and max_new_tokens an int >= 1; ContextTooLong unless prompt +
        max_new_tokens fit max_context tokens (`where` names that context in the message)."""
        if not self.prompt or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                      for t in self.prompt):
            raise ValueError(f"a prompt must be a non-empty list of token ids in [0, {vocab})")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if len(self.prompt) + self.max_new_tokens > max_context:
            raise ContextTooLong(f"prompt ({len(self.prompt)} tokens) + max_new_tokens ({self.max_new_tokens}) exceeds "
                                 f"{where} of {max_context} tokens: shorten the prompt or lower max_new_tokens")

    @property
    def output(self) -> list[int]:
        return self.context[len(self.prompt):]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def read_step_row(row: list[int], node_tokens: list[int], top_k: int) -> tuple[list[int], dict | None]:
    """One row of verify_step's result, read on the host -> (the new tokens, {node token: the model's top-k next
    tokens} for the row's real nodes, or None without top_k). O(tree size)."""
    n, rest = row[0], row[1:]
    if not top_k:
        return rest[:n], None
    T = len(rest) // (1 + top_k)
    tops = rest[T:]
    return rest[:n], {tok: tops[i * top_k:(i + 1) * top_k] for i, tok in enumerate(node_tokens)}


def context_limit(model) -> tuple[int, str]:
    """The most tokens a row may hold (prompt + output) on this model, and what that limit is: the model's context,
    or its sliding window, which lookahead does not implement."""
    cfg = model.config
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        return cfg.sliding_window, "the model's sliding window (which lookahead does not implement)"
    return cfg.max_position_embeddings, "the model's context"


class Engine:
    """Iteration-level batching over a static cache of `max_batch` rows of `max_context` tokens (prompt + output).

    lookahead: the drafting settings (None = plain one-token steps); `configure` changes them between requests.
    isolate_failures: a step that raises is retried row by row, so a failing request fails alone (the server);
    otherwise the error propagates (generate).
    cost: a fixed step price for the drafter (`StepPrice`: `cost(rows, tokens)`; replay's modeled curves); None =
    the model's `StepCost`, learned from the engine's own steps.
    prefill_chunk: prompt tokens one step carries (all rows together) for requests added with defer=True, and the
    chunk of a prefill at add (at least one token per row).
    clock: the seconds the engine times its steps by (what the learned step costs and the drafting gate see).
    """

    def __init__(self, model, max_batch: int, max_context: int, lookahead: LookaheadConfig | None = None,
                 isolate_failures: bool = False, cost: StepPrice | None = None,
                 prefill_chunk: int = PREFILL_CHUNK_TOKENS, clock=time.perf_counter):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        cfg = model.config
        if not isinstance(max_context, int) or max_context < 2:
            raise ValueError(f"max_context must be an int >= 2, got {max_context!r}")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an int >= 1 (prompt tokens per step), got {prefill_chunk!r}")
        self.model, self.max_batch, self.max_context, self.clock = model, max_batch, max_context, clock
        self.prefill_chunk = prefill_chunk
        # the prefill is a verify chain where that gives a one-token step's bits (the C++ CPU path)
        self.prefill_in_steps = bool(getattr(model, "prefill_in_verify", False))
        self.dtype, self.device = model.dtype, model.device
        self.isolate_failures = isolate_failures
        # normal tensors even when built under inference_mode: a later call outside it updates them in place
        with torch.inference_mode(False):
            # room for the largest tree past a full row: a draft's K/V are written after the committed tokens
            self.cache = KVCache(cfg.n_layers, max_batch, cfg.n_kv_heads, max_context + MAX_TREE_NODES,
                                 cfg.head_dim, model.dtype, model.device)
            self.views = {n: self.cache.rows(0, n) for n in range(1, max_batch + 1)}  # rows [0, n): one per n
            self.active = torch.zeros(max_batch, dtype=torch.long, device=model.device)  # 1 = the row advances
            self.chooser = TokenChooser(max_batch, cfg.vocab_size, model.device)
        self.slots: list[Sequence | None] = [None] * max_batch
        self.graphs: StepGraphs | None = None  # made on the first step that can replay a graph
        self.steps = 0
        self.host_s = 0.0  # drafting, packing and committing, summed over steps
        self._device_s = 0.0  # the last step's device work and its one read (for StepCost and host_s)
        self._shapes_run: set[tuple[int, int]] = set()  # (rows, tree size) of the padded (graph) steps run so far
        self.config: LookaheadConfig | None = None
        self.drafter: Proposer | None = None
        self.fixed_cost = cost
        self.cost: StepCost | None = None  # the learned step costs the steps feed (None with a fixed cost)
        self.configure(lookahead)

    def fits(self, model, max_batch: int, max_context: int) -> bool:
        """Whether this engine can serve a call of max_batch rows of max_context tokens on the model as it is."""
        return (model is self.model and model.dtype == self.dtype and model.device == self.device
                and max_batch <= self.max_batch and max_context <= self.max_context)

    def configure(self, lookahead: LookaheadConfig | None, drafter=None) -> None:
        """Drafting settings for the requests added from now on (only between requests: no row may be busy).
        The drafter is built over the model's current trie, calibration and recycled tokens; with adaptive drafting
        it prices trees with this engine's learned step costs (or its fixed `cost`). drafter: one to use instead
        (replay's peers: anything with begin_request, update, draft_batch, end_request, running_requests).
        `exact=True` turns the model's batch-invariant forwards on (`model.set_exact`) for this and later calls,
        plain ones included, until `model.set_exact(False)`: lookahead equals plain decoding bit for bit only when
        both run them."""
        if any(self.slots):
            raise ValueError("configure() needs an idle engine: finish or remove its requests first")
        if lookahead is not None and drafter is None:
            state = self.model.state
            price = None
            if lookahead.adaptive:
                price = self.fixed_cost if self.fixed_cost is not None else self.step_cost(
                    bucket_size(lookahead.decoding_length + 1))
            # ValueError for a trie of another shape: nothing changed
            drafter = Drafter(lookahead, trie=self.model.trie, calibration=state.calibration, successors=state.successors,
                              step_cost=price, pools=state.pools)
        if lookahead is not None and lookahead.exact and not self.model.exact:
            self.model.set_exact(True)  # stays on (plain steps must be batch-invariant too) until set_exact(False)
        self.config, self.drafter = lookahead, drafter
        # a step's trees: the Drafter builds them itself; another proposer's (tokens, parents) are laid out here
        self._draft_trees = getattr(drafter, "draft_trees", None) or functools.partial(
            trees_of_batch, drafter, lookahead.layout if lookahead is not None else "hier")
        # other drafting settings and prices: what drafting costs per token is measured anew; kinds of step: with
        # prompt chunks in it or not
        self.gate = DraftGate([(rows, chunks) for rows in range(1, self.max_batch + 1) for chunks in (False, True)])
        # the gate: adaptive drafting priced by this engine's own steps (never with a fixed price: replay must stay
        # deterministic), unless LOOKAHEAD_DRAFT_GATE=0
        self._gating = (drafter is not None and self.fixed_cost is None and lookahead is not None
                        and lookahead.adaptive and draft_gate_enabled())

    def step_cost(self, max_tree: int) -> StepCost:
        """The model's learned step costs (kept on `model.state` across engines and calls), started from
        `prior_curve`; a prior that changed (a newly calibrated or assigned curve) starts them anew."""
        prior = prior_curve(self.model, max_tree)
        key = curve_key(self.model)
        cost = self.model.state.step_costs.get(key)
        if cost is None or cost.source is not prior:
            cost = self.model.state.step_costs[key] = StepCost(prior)
        self.cost = cost
        return cost

    # ---- requests in and out --------------------------------------------------------------------------------
    def free_rows(self) -> int:
        return sum(s is None for s in self.slots)

    def busy(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def drafting_requests(self) -> int:
        """Requests the drafter still holds state for (0 once every request has left)."""
        return len(self.drafter.running_requests()) if self.drafter is not None else 0

    def add(self, seqs: list[Sequence], defer: bool = False) -> list[tuple[Sequence, list[int]]]:
        """Admit the sequences into free rows (lowest first) -> [(sequence, [first token])] of those prefilled
        here; a sequence that ends there (eos, max_new_tokens 1) has left its row again. defer=False: prefilled now
        (on CPU by steps that carry only these rows' prompt chunks; on CUDA one padded `model.prefill` per run of
        consecutive rows). defer=True, where the prefill is a verify chain (CPU): each later `step` carries up to
        `prefill_chunk` prompt tokens beside the running rows, and a row's first token is an event of the step
        that finishes its prompt. ValueError if a prompt + max_new_tokens does not fit a row or there are too few
        free rows; nothing is changed then. A prefill that raises: with isolate_failures its rows are retried
        alone and a row that still fails ends with finish_reason "error" (no event); otherwise every row of the
        call is freed and the error propagates."""
        for seq in seqs:
            seq.check(self.model.config.vocab_size, self.max_context)
        free = [r for r, s in enumerate(self.slots) if s is None]
        if len(seqs) > len(free):
            raise ValueError(f"{len(seqs)} requests but {len(free)} free rows: finish or remove requests first")
        for seq, row in zip(seqs, free):
            seq.row, seq.prefilled = row, 0
            self.slots[row] = seq
            self.active[row] = 1
            self.chooser.set_row(row, seq.sampling, seq.prompt, seq.noise_row)
            if self.drafter is not None and seq.pool is None:
                self.drafter.begin_request(seq.request_id, seq.prompt, seq.references)
            elif self.drafter is not None:
                self.drafter.begin_request(seq.request_id, seq.prompt, seq.references, pool=seq.pool)
        if self.prefill_in_steps:
            self.cache.lens[[s.row for s in seqs]] = 0
            return [] if defer else self._prefill_in_steps(seqs)
        groups: list[list[Sequence]] = []  # runs of consecutive rows whose right-padding stays small
        for seq in sorted(seqs, key=lambda s: s.row):
            group = groups[-1] if groups else None
            if group and seq.row == group[-1].row + 1 and _padding(group + [seq]) <= PREFILL_MAX_PADDING:
                group.append(seq)
            else:
                groups.append([seq])
        events = []
        with torch.inference_mode():
            for i, group in enumerate(groups):
                try:
                    events += self._prefill(group)
                except Exception:
                    if not self.isolate_failures:
                        for seq in (s for g in groups[i:] for s in g):
                            self._release(seq, "error")
                        raise
                    log.exception("a prefill of %d rows failed: retrying its rows one by one", len(group))
                    for seq in group:  # a failed prefill wrote only its rows' scratch: each is tried alone
                        try:
                            events += self._prefill([seq])
                        except Exception as e:
                            seq.error = f"{type(e).__name__}: {e}"
                            self._release(seq, "error")
        return events

    def _prefill_in_steps(self, seqs: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """Steps that carry only these rows' prompt chunks (at most prefill_chunk tokens each, at least one per
        row) until every prompt is in: the other rows wait. A failure frees the rows of this call (propagating it
        unless isolate_failures, which retries row by row inside the step)."""
        events, waiting = [], set(seqs)
        try:
            while any(s.row is not None and s.prefilled < len(s.prompt) for s in waiting):
                budget = max(self.prefill_chunk, len(waiting))
                events += self._step_rows(lambda seq: seq in waiting, budget, decode=False)
        except Exception:
            for seq in seqs:
                if seq.row is not None:
                    self._release(seq, "error")
            raise
        return events

    def _prefill(self, group: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """Consecutive rows' prompts, right-padded, K/V at slots 0.., each row's first token. At most
        PREFILL_CHUNK_TOKENS tokens (all rows together) go through one forward, so a long prompt's activations
        stay bounded: the first chunk is a prefill, the next ones are causal chains through `verify`."""
        start, n = group[0].row, len(group)
        width = max(len(s.prompt) for s in group)
        ids = torch.tensor([s.prompt + [0] * (width - len(s.prompt)) for s in group], device=self.device)  # (n, W)
        lengths = torch.tensor([len(s.prompt) for s in group], device=self.device)
        logits = self._chunked_prefill(ids, lengths, self.cache.rows(start, start + n))  # (n, V)
        first = self.chooser(logits[:, None], lengths[:, None], start=start)[:, 0].tolist()
        for seq in group:
            self.active[seq.row] = 1
            seq.prefilled = len(seq.prompt)
        return [self._commit(seq, [tok]) for seq, tok in zip(group, first)]

    def _chunked_prefill(self, ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`model.prefill` over ids [n, W] in chunks of PREFILL_CHUNK_TOKENS // n tokens per row -> logits [n, V]
        after each row's last real token. A row whose prompt ended in an earlier chunk keeps its length: the
        padding K/V a later chunk writes past it are scratch."""
        n, width = ids.shape
        chunk = max(1, PREFILL_CHUNK_TOKENS // n)
        if width <= chunk:
            return self.model.prefill(ids, lengths, cache)
        last = lengths - 1  # (n,) the position whose logits give each row's first token
        logits = self.model.prefill(ids[:, :chunk], lengths.clamp(max=chunk), cache)  # (n, V), right for rows <= chunk
        for begin in range(chunk, width, chunk):
            tokens = ids[:, begin:begin + chunk]  # (n, C)
            C = tokens.shape[1]
            depths = torch.arange(C, device=ids.device).expand(n, C)
            out = self.model.verify(tokens, depths, cache, None)  # (n, C, V): K/V at slots lens + i
            here = (last >= begin) & (last < begin + C)  # (n,) rows whose last prompt token is in this chunk
            rows = here.nonzero()[:, 0]
            logits[rows] = out[rows, last[rows] - begin]
            cache.lens.copy_(torch.minimum(lengths, torch.full_like(lengths, begin + C)))
        return logits

    def remove(self, seq: Sequence, reason: str) -> None:
        """End a running request now (cancelled, timed out, failed): its row, sampler row and drafter state go."""
        if seq.row is not None and self.slots[seq.row] is seq:
            self._release(seq, reason)

    def _release(self, seq: Sequence, reason: str) -> None:
        row = seq.row
        self.slots[row] = None
        self.active[row] = 0
        self.chooser.clear_row(row)
        seq.row, seq.finish_reason = None, reason
        if self.drafter is not None:
            self.drafter.end_request(seq.request_id)

    # ---- one step ---------------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, list[int]]]:
        """One decode step over rows [0, last busy row] -> [(sequence, its new tokens)] for every row that got
        tokens (a failed row, with isolate_failures, gets no entry and has finish_reason "error"). Rows still
        prefilling (add(defer=True)) carry up to prefill_chunk prompt tokens in all (PREFILL_CHUNK_TOKENS while no
        row decodes), oldest rows first; a row's first token comes from the step that finishes its prompt."""
        decoding = any(s is not None and s.prefilled >= len(s.prompt) for s in self.slots)
        # with no row decoding, no row's time per token is at stake: prompts go in whole chunks
        budget = self.prefill_chunk if decoding else max(self.prefill_chunk, PREFILL_CHUNK_TOKENS)
        return self._step_rows(lambda seq: True, budget, decode=True)

    def _step_rows(self, chosen, budget: int, decode: bool) -> list[tuple[Sequence, list[int]]]:
        """One ragged step over the busy rows `chosen` takes: prompt chunks within `budget` tokens, and (decode)
        every decoding row's tree (its root alone where the drafter is off or gated off)."""
        n = max((r for r, s in enumerate(self.slots) if s is not None and chosen(s)), default=-1) + 1
        if n == 0:
            return []
        t0 = self.clock()
        seqs = [s if s is not None and chosen(s) else None for s in self.slots[:n]]
        chains: list[list[int]] = [[] for _ in range(n)]
        trees: list[DraftTree | None] = [None] * n
        decoding = [s is not None and s.prefilled >= len(s.prompt) and decode for s in seqs]
        for b in sorted((b for b, s in enumerate(seqs) if s is not None and not decoding[b] and
                         s.prefilled < len(s.prompt)), key=lambda b: seqs[b].request_id):  # oldest first
            seq = seqs[b]
            take = min(len(seq.prompt) - seq.prefilled, budget)
            if take <= 0:
                break
            chunk = seq.prompt[seq.prefilled:seq.prefilled + take]
            budget -= take
            if seq.prefilled + take == len(seq.prompt):  # the prompt's last token: the root of its first tree
                chains[b], trees[b] = chunk[:-1], DraftTree([chunk[-1]], [-1], [0])
            else:
                chains[b] = chunk
        with nvtx_range("draft"):
            rows = sum(1 for b in range(n) if decoding[b] or chains[b] or trees[b] is not None)
            drafting = self.drafter is not None and any(decoding) and self.gate_open(sum(decoding),
                                                                                         any(chains))
            if drafting:
                ids = [s.request_id if decoding[b] else -1 for b, s in enumerate(seqs)]
                contexts = [s.context if decoding[b] else None for b, s in enumerate(seqs)]
                drafted = self._draft_trees(ids, contexts, batch_size=rows, extra_tokens=sum(len(c) for c in chains))
                trees = [drafted[b] if decoding[b] else trees[b] for b in range(n)]
            else:  # decoding rows verify their root alone
                trees = [DraftTree([s.context[-1]], [-1], [0]) if decoding[b] else trees[b]
                         for b, s in enumerate(seqs)]
        top_k = min(self.config.recycle_top_k, self.model.config.vocab_size) if drafting else 0
        with torch.inference_mode():
            try:
                results = self._run(0, n, chains, trees, top_k)
            except Exception:
                if not self.isolate_failures:
                    raise
                log.exception("a step of %d rows failed: retrying its rows one by one", n)
                results = self._run_alone(seqs, chains, trees, top_k)
        t2 = self.clock()
        events, decoded = [], 0  # decoded: tokens of the decoding rows (a prompt's first token is not theirs)
        with nvtx_range("commit"):
            for b, seq in enumerate(seqs):
                if seq is None or results[b] is None or (not chains[b] and trees[b] is None):
                    continue
                seq.prefilled += len(chains[b]) + (0 if decoding[b] or trees[b] is None else 1)
                if trees[b] is None:  # a prompt chunk that does not end the prompt: no token yet
                    continue
                seq.draft_tokens += len(trees[b].tokens) - 1
                events.append(self._commit(seq, *read_step_row(results[b], trees[b].tokens, top_k)))
                decoded += len(events[-1][1]) if decoding[b] else 0
        self.steps += 1
        end = self.clock()
        self.host_s += (t2 - t0) - self._device_s + (end - t2)
        if self._gating and any(decoding):
            self.gate.learn(sum(decoding), any(chains), drafting, end - t0, decoded)
        return events

    # ---- the gate: drafting on or off, by what the steps cost per token ------------------------------------------
    def gate_open(self, rows: int, prefilling: bool) -> bool:
        """Whether this step of `rows` decoding rows drafts (`DraftGate`: per row count and kind of step, with
        prompt chunks riding in it or not, since a step paced by a prefill gains little from decoding rows that
        finish sooner). Always open without the gate."""
        return self.gate.open(rows, prefilling) if self._gating else True

    def _run(self, start: int, stop: int, chains: list[list[int]], trees: list[DraftTree | None],
             top_k: int) -> list[list[int]]:
        """The device step over rows [start, stop) and its one device-to-host read; the cost model learns its
        seconds."""
        n = stop - start
        batch = pack_ragged(chains[start:stop], trees[start:stop], self.device, pad=self.device.type == "cuda")
        view = self.views[n] if start == 0 else self.cache.rows(start, stop)
        active = self.active[start:stop]
        t1 = self.clock()
        lens = view.lens.clone() if self.isolate_failures else None
        try:
            if batch.uniform and start == 0 and self.chooser.plain_argmax(n) and graphs_enabled(self.model):
                if self.graphs is None or self.graphs.exact != self.model.exact:  # captured with other kernels
                    self.graphs = StepGraphs(self.model)
                result = self.graphs.run(view, self.chooser, batch, active, top_k=top_k)
            else:
                result = verify_step(self.model, view, self.chooser, batch, active, top_k=top_k, start=start)
            host = result.tolist()  # the one device-to-host sync of the step
        except Exception:
            if lens is not None:
                view.lens.copy_(lens)  # the step wrote only scratch slots past each row's length
            raise
        self._device_s = self.clock() - t1
        rows = sum(1 for t in trees[start:stop] if t is not None)
        tokens = batch.num_tokens
        if batch.uniform and (n, tokens) not in self._shapes_run:  # a graph's first step captures it: that would
            self._shapes_run.add((n, tokens))                        # overprice its shape
        elif self.cost is not None and rows and not any(chains[start:stop]):
            # steps with prompt chunks are not samples: a chunk's causal attention (each token over the chunk
            # before it) costs more than a tree of as many tokens, and would overprice the trees' (rows, tokens)
            self.cost.observe(rows, tokens / rows, self._device_s)
        return host

    def _run_alone(self, seqs: list[Sequence | None], chains, trees, top_k: int) -> list[list[int] | None]:
        results: list[list[int] | None] = [None] * len(seqs)
        for b, seq in enumerate(seqs):
            if seq is None or (not chains[b] and trees[b] is None):
                continue
            try:
                results[b] = self._run(b, b + 1, chains, trees, top_k)[0]
            except Exception as e:
                log.exception("request %s failed in its step", seq.request_id)
                seq.error = f"{type(e).__name__}: {e}"
                self._release(seq, "error")
        return results

    def _commit(self, seq: Sequence, new: list[int], predictions: dict | None = None) -> tuple[Sequence, list[int]]:
        """Append a row's accepted tokens, cut at the first eos, stop string or max_new_tokens, and tell the sampler
        and the drafter; a row that ends leaves its slot."""
        new, ended = cut_new_tokens(new, seq.context, len(seq.prompt), seq.max_new_tokens, seq.eos, seq.stops)
        seq.context += new
        seq.steps += 1
        self.chooser.commit(seq.row, new)
        if self.drafter is not None:
            self.drafter.update(seq.request_id, new, predictions)
        if ended is not None:
            self._release(seq, ended)
        return seq, new


def _padding(group: list[Sequence]) -> float:
    """The share of a padded prefill forward's tokens that would be padding."""
    width = max(len(s.prompt) for s in group)
    return 1.0 - sum(len(s.prompt) for s in group) / (width * len(group))
