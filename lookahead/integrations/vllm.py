"""The `Drafter` as a vLLM speculative proposer (docs/API.md, "Inside vLLM"):

    LLM(model=DIR, speculative_config={"method": "custom_class",
        "model": "lookahead.integrations.vllm.LookaheadProposer", "num_speculative_tokens": 8})

vLLM builds it as `LookaheadProposer(vllm_config)`, calls `load_model(model)` once and, after every step,
`propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)` -> one draft (a chain) per batch row. vLLM passes
no request ids, and it moves requests between rows (condensing the batch when requests finish), so the proposer
finds which request a row holds from the row's tokens: a row continues request r exactly when it holds r's
committed tokens followed by the tokens the step sampled; any other row is a new request (its prompt = what the
row held before the step). Requests no row holds any more are ended in the drafter. One `Drafter` (one trie)
serves every request, as in `generate`. vLLM is never imported here.

Tenants (docs/tenants.md): vLLM (0.32.0) keeps a request's `cache_salt` in its scheduler and KV block hashes; the
worker that calls `propose` is never told it, nor request ids. So the proposer isolates by request where asked
(LOOKAHEAD_VLLM_POOLS=request: a request drafts only from its own tokens and the saved trie), and by salt only
where its caller passes each row's salt (`propose(..., pools=[...])`).

Options (environment variables, read when vLLM builds the proposer; speculative_config fields in brackets):
    [num_speculative_tokens]        K, the longest chain a row gets
    [prompt_lookup_max]             LookaheadConfig.max_query_length (default 8), the longest context suffix matched
    LOOKAHEAD_VLLM_BRANCH_LENGTH    LookaheadConfig.branch_length (default 16): the trie's window length
    LOOKAHEAD_VLLM_TRIE             a saved TokenTrie (`TokenTrie.save`) to start from when the file exists; the
                                    trie is saved back there when the process exits
    LOOKAHEAD_VLLM_STEP_TOKENS      what a step costs besides its tokens, in verified tokens (step = a + b * tokens,
                                    this is a / b at every batch size; default: STEP_TOKENS_CPU for the model's
                                    dtype, measured here per batch size); "inf" = every row drafts its whole chain
                                    (a GPU)
    LOOKAHEAD_VLLM_GATE             1 (default): time vLLM's steps between calls and propose nothing where steps
                                    that verified drafts cost more per committed token than plain ones (probing
                                    drafting every 8th step); 0: off
    LOOKAHEAD_VLLM_POOLS            shared (default): every request drafts from every earlier one's output;
                                    request: from its own prompt and output and the saved trie only (read-only):
                                    nothing one request generates is drafted for another
"""

from __future__ import annotations

import atexit
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lookahead.config import LookaheadConfig
from lookahead.engine.pricing import DraftGate
from lookahead.drafting.drafter import Drafter
from lookahead.drafting.trie import TokenTrie

# vLLM's CPU step as a + b * tokens: a / b by batch size and dtype, measured by `lookahead bench-vllm --step-cost`
# (docs/benchmarks.md#step_tokens_cpu); linear in the batch size between and beyond them, clamped.
STEP_TOKENS_CPU = {"float32": {1: 8.5, 8: 30.8}, "bfloat16": {1: 81.8, 8: 25.5}}


def step_table(dtype) -> dict[int, float]:
    """The measured a / b table for vLLM's dtype (a torch dtype or its name): bf16's for bf16 (vLLM's CPU default
    where the CPU has native bf16) and for fp16, which was not measured; fp32's otherwise."""
    name = str(dtype).replace("torch.", "")
    return STEP_TOKENS_CPU["bfloat16" if name in ("bfloat16", "float16", "half") else "float32"]


class LinearStep:
    """vLLM's step as a + b * verified tokens, in units of b: the proposer's step price (`cost(rows, tokens)`, the
    interface every Drafter prices with). a_over_b: a / b by batch size, linear between the sizes, clamped."""

    def __init__(self, a_over_b: Mapping[int, float]):
        self.a_over_b = dict(a_over_b)

    def overhead(self, rows: int) -> float:
        """a / b at `rows` rows."""
        sizes = sorted(self.a_over_b)
        lo = max([b for b in sizes if b <= rows], default=sizes[0])
        hi = min([b for b in sizes if b >= rows], default=sizes[-1])
        if hi == lo:
            return self.a_over_b[lo]
        return self.a_over_b[lo] + (self.a_over_b[hi] - self.a_over_b[lo]) * (rows - lo) / (hi - lo)

    def cost(self, rows: int, tokens: int) -> float:
        return self.overhead(max(rows, 1)) + max(rows, 1) * tokens

@dataclass
class _Held:
    """A request some row held at the last step: its drafter id and committed tokens (prompt + output)."""
    key: int
    tokens: np.ndarray  # int32 [capacity], the first `length` entries committed
    length: int

    def extend(self, new: np.ndarray) -> None:
        end = self.length + len(new)
        if end > len(self.tokens):
            grown = np.empty(max(end, 2 * len(self.tokens)), dtype=np.int32)
            grown[:self.length] = self.tokens[:self.length]
            self.tokens = grown
        self.tokens[self.length:end] = new
        self.length = end


@dataclass
class ProposerStats:
    """What the proposer did: steps it drafted for, rows, chain tokens proposed, and its host seconds."""
    steps: int = 0
    rows: int = 0
    drafted: int = 0
    requests: int = 0
    host_s: list[float] = field(default_factory=list)  # per propose() call


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be > 0 (or inf), got {raw!r}")
    return value


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


class LookaheadProposer:
    """vLLM's custom_class proposer: per batch row, the shared Drafter's best chain of at most K tokens, cut where
    its expected accepted tokens stop paying for their verify cost (an empty list: a plain step for the row)."""

    last: LookaheadProposer | None = None  # the latest instance, for benchmarks reading `stats` in-process

    def __init__(self, vllm_config=None, *, num_speculative_tokens: int | None = None, gate: bool | None = None,
                 step: LinearStep | None = None, clock=time.perf_counter):
        spec = getattr(vllm_config, "speculative_config", None)
        k = num_speculative_tokens if num_speculative_tokens is not None else getattr(spec, "num_speculative_tokens",
                                                                                      None)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_speculative_tokens must be an int >= 1 (the longest draft vLLM verifies), got "
                             f"{k!r}: set speculative_config['num_speculative_tokens']")
        self.k = k
        model_config = getattr(vllm_config, "model_config", None)
        self.max_model_len = getattr(model_config, "max_model_len", None)
        max_query = getattr(spec, "prompt_lookup_max", None) or LookaheadConfig.max_query_length
        forced = _env_float("LOOKAHEAD_VLLM_STEP_TOKENS", 0.0)
        # an infinite a / b: verified tokens are free next to the step (a GPU), every row drafts its whole chain
        if step is None and not math.isinf(forced):
            step = LinearStep({1: forced} if forced else step_table(getattr(model_config, "dtype", "float32")))
        self.trie_path = os.environ.get("LOOKAHEAD_VLLM_TRIE") or None
        trie = (TokenTrie.load(self.trie_path) if self.trie_path and Path(self.trie_path).is_file() else
                TokenTrie(branch_length=_env_int("LOOKAHEAD_VLLM_BRANCH_LENGTH", LookaheadConfig.branch_length)))
        config = LookaheadConfig.for_trie(trie, max_query_length=max_query,
                                          decoding_length=max(LookaheadConfig.decoding_length, k))
        self.drafter = Drafter(config, trie=trie, step_cost=step)
        self.isolate = os.environ.get("LOOKAHEAD_VLLM_POOLS", "shared") or "shared"
        if self.isolate not in ("shared", "request"):
            raise ValueError(f"LOOKAHEAD_VLLM_POOLS must be 'shared' or 'request', got {self.isolate!r}")
        self.stats = ProposerStats()
        self._held: dict[int, _Held] = {}  # row -> the request it held at the last step
        self._next_key = 0
        # the gate: what vLLM's steps measurably cost per committed token with drafts and without, per row count
        self.gate = DraftGate() if (gate if gate is not None else _env_int("LOOKAHEAD_VLLM_GATE", 1)) else None
        self.clock = clock
        self._last_call: tuple[float, int, bool] | None = None  # (start, rows, drafted) of the last propose
        if self.trie_path:
            atexit.register(self.save_trie)
        LookaheadProposer.last = self

    def load_model(self, model) -> None:
        """vLLM hands over the target model; the drafter needs none."""

    def save_trie(self) -> None:
        if self.trie_path:
            self.drafter.trie.save(self.trie_path)

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray, token_ids_cpu: np.ndarray,
                slot_mappings=None, pools=None) -> list[list[int]]:
        """sampled_token_ids[i]: what row i committed this step (empty = the row takes no draft);
        num_tokens_no_spec [rows] int: row i's committed length, those tokens included; token_ids_cpu
        [max_num_seqs, max_model_len] int: row i's committed tokens in [:num_tokens_no_spec[i]]. pools: per row,
        the drafting pool (e.g. its cache_salt; None = shared) of a request that begins there (vLLM passes none)."""
        start = self.clock()
        rows = len(sampled_token_ids)
        if len(num_tokens_no_spec) < rows or token_ids_cpu.ndim != 2 or token_ids_cpu.shape[0] < rows:
            raise ValueError(f"{rows} rows of sampled tokens but num_tokens_no_spec has {len(num_tokens_no_spec)} "
                             f"and token_ids_cpu has shape {tuple(token_ids_cpu.shape)}")
        self._check_rows(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)  # before anything changes
        begun = self.stats.requests
        if pools is not None and len(pools) < rows:
            raise ValueError(f"pools has {len(pools)} entries for {rows} rows: give one per row (None = shared)")
        held, claimed = self._match_rows(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, pools)
        ended = 0
        for row, req in list(self._held.items()):  # requests no row holds any more have finished
            if id(req) not in claimed:
                self.drafter.end_request(req.key)
                if self.isolate == "request":
                    self.drafter.pools.discard(("request", req.key))
                ended += 1
        self._held = {row: req for row, req in enumerate(held) if req is not None}

        active = max(1, sum(1 for s in sampled_token_ids if len(s)))
        if self.gate is not None and self._last_call is not None and not ended and self.stats.requests == begun:
            # the time since the last call is the step that verified its drafts (and this proposer's own host
            # time); steps that admitted or ended requests carry prefills and scheduling, and are not measured
            last_start, last_rows, drafted = self._last_call
            if last_rows == active:
                self.gate.learn(active, None, drafted, start - last_start, sum(len(s) for s in sampled_token_ids))
        drafting = self.gate is None or self.gate.open(active)
        q = self.drafter.config.max_query_length
        drafts: list[list[int]] = []
        for row, sampled in enumerate(sampled_token_ids):
            req = held[row]
            if req is None or not len(sampled) or not drafting:
                room = 0
            else:  # drafts never run past the model's length
                room = self.k if self.max_model_len is None else min(self.k, self.max_model_len - req.length - 1)
            if room <= 0:
                drafts.append([])
                continue
            tokens, _ = self.drafter.draft_chain(req.key, req.tokens[max(0, req.length - q):req.length], room, active)
            drafts.append(tokens)
            self.stats.drafted += len(tokens)
        self.stats.steps += 1
        self.stats.rows += sum(1 for s in sampled_token_ids if len(s))
        self._last_call = (start, active, any(drafts))
        self.stats.host_s.append(self.clock() - start)
        return drafts

    @staticmethod
    def _check_rows(sampled_token_ids, num_tokens_no_spec, token_ids_cpu) -> None:
        for row, sampled in enumerate(sampled_token_ids):
            n, m = int(num_tokens_no_spec[row]), len(sampled)
            if not m:
                continue
            if n - m < 1 or n > token_ids_cpu.shape[1]:
                raise ValueError(f"row {row} reports {n} committed tokens with {m} sampled this step: "
                                 f"num_tokens_no_spec must count the prompt and the sampled tokens, within "
                                 f"token_ids_cpu's {token_ids_cpu.shape[1]} columns")
            if not np.array_equal(token_ids_cpu[row, n - m:n], np.asarray(sampled)):
                raise ValueError(f"row {row}'s token_ids_cpu[{n - m}:{n}] is not the tokens sampled this step")

    def _match_rows(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, pools=None) -> tuple[list, set]:
        """The request each row holds after this step (None: a row that has not sampled yet), with the
        committed tokens fed to the drafter; a tracked request is claimed by one row at most."""
        by_length: dict[int, list[_Held]] = {}
        for req in self._held.values():
            by_length.setdefault(req.length, []).append(req)
        claimed: set[int] = set()
        held: list[_Held | None] = []
        for row, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[row])
            new = np.asarray(sampled, dtype=np.int32)
            before = n - len(new)  # what the row held before this step
            if before < 1 or before > token_ids_cpu.shape[1]:  # an unused row
                held.append(None)
                continue
            tokens = token_ids_cpu[row]
            previous = self._held.get(row)
            candidates = ([previous] if previous is not None else []) + by_length.get(before, [])
            match = next((r for r in candidates if id(r) not in claimed and r.length == before
                          and np.array_equal(tokens[:before], r.tokens[:before])), None)
            if match is None and len(new):  # a request this proposer has not seen: its prompt is the row so far
                match = _Held(self._next_key, np.array(tokens[:before], dtype=np.int32), before)
                self._next_key += 1
                pool = ("request", match.key) if self.isolate == "request" else (
                    pools[row] if pools is not None else None)
                self.drafter.begin_request(match.key, match.tokens[:before], pool=pool)
                self.stats.requests += 1
            if match is not None:
                claimed.add(id(match))
                if len(new):
                    match.extend(new)
                    self.drafter.update(match.key, new)
            held.append(match)
        return held, claimed
