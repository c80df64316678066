"""Iteration-level batching: one decode loop owns the model and a static KV cache of `max_batch` rows.

A request waits in a queue until a row is free, is prefilled into that row between two steps, and joins the
running batch at the next step. Each step verifies every running row's draft tree in one forward pass over
rows [0, last busy row] (a free row in between gets a root-only tree and does not advance); a finished,
cancelled or failed row frees its slot at once. Rows never see each other: the linear layers are
batch-invariant and attention is per row, so a greedy request returns the tokens it would return alone
(`model.generate(ids, lookahead=False)`), whatever else is in flight. A seeded request draws its noise as row
0 of a batch of one, so its tokens do not depend on the slot it got either.

Everything the loop touches (model, cache, trie, drafter) belongs to its thread; other threads only queue
requests, flag them cancelled and read the counters. Events go back through each request's `sink`, called
from the loop thread.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lookahead.cache import KVCache
from lookahead.config import LookaheadConfig
from lookahead.draft import bucket_size, draft_trees, pack_drafts
from lookahead.generation import StopStrings, cut_new_tokens, drafter_for
from lookahead.sampling import TokenChooser
from lookahead.steps import read_step_row, tree_step
from lookahead.trie import TokenTrie

log = logging.getLogger("lookahead.serve")

DEFAULT_MAX_CONTEXT = 2048  # tokens per row (prompt + completion) unless --max-context says otherwise


class QueueFull(Exception):
    """More requests are waiting for a row than the engine queues (HTTP 503)."""


class ContextTooLong(ValueError):
    """The prompt plus max_tokens do not fit a row of the cache (HTTP 400, context_length_exceeded)."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings. temperature 0 = greedy; otherwise Gumbel-max sampling with top_p, keyed
    by seed (a random one when None), exactly as `model.generate(do_sample=True, ...)` samples."""
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Tokens:
    """Event: tokens committed by one step (or the prefill), in order."""
    tokens: list[int]


@dataclass
class Finished:
    """Event, the last one: why the request ended ("stop", "length", "cancelled", "error") and its counts."""
    reason: str
    prompt_tokens: int
    completion_tokens: int
    steps: int          # forward passes that produced its tokens, the prefill included
    draft_tokens: int   # draft nodes verified for it
    error: str | None = None

    @property
    def accepted_per_step(self) -> float:
        return self.completion_tokens / max(self.steps, 1)


@dataclass
class EngineStats:
    """Counters since start; `max_batch_seen` is the most requests that shared one step."""
    steps: int = 0
    row_steps: int = 0  # sum over steps of the requests in the step
    max_batch_seen: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    trie_saves: int = 0

    def as_dict(self) -> dict:
        return {**self.__dict__, "mean_batch": self.row_steps / max(self.steps, 1)}


class Request:
    """One request in the engine. Made by `Engine.submit` (validates the settings: ValueError); after that only
    the loop thread touches it, except `cancelled`."""

    def __init__(self, request_id: int, prompt: list[int], params: SamplingParams, sink: Callable[[object], None],
                 vocab: int, device: torch.device, tokenizer):
        self.id, self.prompt, self.params, self.sink = request_id, prompt, params, sink
        if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {params.max_tokens!r}")
        # a batch of one: the noise is row 0's, as in a solo model.generate call with this seed
        self.chooser = TokenChooser(do_sample=True, temperature=params.temperature, top_k=0, top_p=params.top_p,
                                    repetition_penalty=1.0, seed=params.seed, vocab=vocab, prompts=[prompt],
                                    device=device) if params.temperature > 0 else None
        self.stops = StopStrings(list(params.stop), tokenizer) if params.stop else None
        self.context = list(prompt)  # prompt + output so far
        self.steps = 0
        self.draft_tokens = 0
        self.cancelled = False
        self.row: int | None = None

    @property
    def output(self) -> list[int]:
        return self.context[len(self.prompt):]

    def finished(self, reason: str, error: str | None = None) -> Finished:
        return Finished(reason, len(self.prompt), len(self.context) - len(self.prompt), self.steps,
                        self.draft_tokens, error)


class RowChooser:
    """The target token of every node of a step whose rows have different settings: plain argmax for greedy
    rows, each sampled row through its request's own TokenChooser (a batch of one, row 0)."""

    def __init__(self, requests: list[Request | None]):
        self.requests = requests

    def __call__(self, logits: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor | None = None,
                 tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        targets = logits.argmax(-1)  # (B, T)
        for b, req in enumerate(self.requests):
            if req is not None and req.chooser is not None:
                one = slice(b, b + 1)
                targets[one] = req.chooser(logits[one], positions[one], None if tokens is None else tokens[one],
                                           None if tree_mask is None else tree_mask[one])
        return targets


class Engine:
    """The decode loop of a server. `submit` queues a request (QueueFull past `max_queue` waiting, EngineClosed
    after `close`); its sink then receives Tokens events and one Finished event, from the loop thread.

    lookahead: the drafting settings, None for plain one-token decoding. trie_path: the shared trie is loaded
    from there at start (a missing file starts it empty) and saved there, atomically, every
    `trie_save_minutes` (0 = only at close) and at close.
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_context: int | None = None,
                 max_queue: int = 256, lookahead: LookaheadConfig | None = LookaheadConfig(),
                 trie_path: str | Path | None = None, trie_save_minutes: float = 10.0):
        cfg = model.config
        limit = min(cfg.max_position_embeddings, cfg.sliding_window or cfg.max_position_embeddings)
        max_context = min(DEFAULT_MAX_CONTEXT, limit) if max_context is None else max_context
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not isinstance(max_context, int) or not 2 <= max_context <= limit:
            raise ValueError(f"max_context must be an int in [2, {limit}] (the model's context), got {max_context!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
        if trie_save_minutes < 0:
            raise ValueError(f"trie_save_minutes must be >= 0, got {trie_save_minutes!r}")
        self.model = model
        self.tokenizer = copy.deepcopy(tokenizer)  # its own: a fast tokenizer is not safe to share across threads
        self.max_batch, self.max_context, self.max_queue = max_batch, max_context, max_queue
        self.config = lookahead
        self.eos = set(cfg.eos_token_id)
        self.trie_path = Path(trie_path) if trie_path is not None else None
        self.save_every_s = trie_save_minutes * 60.0
        if self.trie_path is not None:
            shape = lookahead or LookaheadConfig()
            self.model.trie = (TokenTrie.load(self.trie_path) if self.trie_path.exists() else
                               TokenTrie(shape.branch_length, shape.max_trie_nodes))
        self.trie = self.model.trie  # shared by every request (the drafter's), saved to trie_path
        # the drafter over model.trie and the model's calibration; measures the cost curve once if none is cached
        self.drafter = drafter_for(model, lookahead) if lookahead is not None else None
        max_tree = bucket_size(lookahead.decoding_length + 1) if lookahead is not None else 1
        self.cache = KVCache(cfg.n_layers, max_batch, cfg.n_kv_heads, max_context + max_tree, cfg.head_dim,
                             model.dtype, model.device)
        self.slots: list[Request | None] = [None] * max_batch
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._pending: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._next_save = time.monotonic() + self.save_every_s

    # ---- other threads ---------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lookahead-decode", daemon=True)
            self._thread.start()
        return self

    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[object], None]) -> Request:
        """Queue a request; ValueError for bad settings, ContextTooLong for a prompt + max_tokens beyond
        max_context."""
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"the prompt holds token ids outside the vocabulary [0, {vocab})")
        if len(prompt) + params.max_tokens > self.max_context:
            raise ContextTooLong(f"this server's context is {self.max_context} tokens, but "
                                 f"{len(prompt) + params.max_tokens} were requested ({len(prompt)} in the prompt, "
                                 f"{params.max_tokens} max_tokens): shorten the prompt or lower max_tokens")
        with self._cond:
            req = Request(next(self._ids), list(prompt), params, sink, vocab, self.model.device, self.tokenizer)
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._pending)} requests are already waiting for a slot: retry later")
            self._pending.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request at the next step boundary (no-op once it finished); its slot frees then."""
        req.cancelled = True

    def load(self) -> dict:
        return {"running": sum(r is not None for r in self.slots), "queued": len(self._pending)}

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop: requests still queued or running end "cancelled"; the trie is saved (trie_path)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self._shutdown()

    # ---- the loop thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._closing or self._pending or any(self.slots)):
                        self._cond.wait(self._seconds_to_save())
                        self._maybe_save_trie()
                    if self._closing:
                        break
                self._maybe_save_trie()
                self._drop_cancelled()
                self._admit()
                if any(self.slots):
                    self._step()
            self._shutdown()

    def _seconds_to_save(self) -> float | None:
        if self.trie_path is None or self.save_every_s <= 0:
            return None
        return max(0.0, self._next_save - time.monotonic())

    def _maybe_save_trie(self) -> None:
        if self.trie_path is not None and self.save_every_s > 0 and time.monotonic() >= self._next_save:
            self._save_trie()
            self._next_save = time.monotonic() + self.save_every_s

    def _save_trie(self) -> None:
        try:
            self.trie_path.parent.mkdir(parents=True, exist_ok=True)
            self.trie.save(self.trie_path)  # a temp file, then an atomic rename
            self.stats.trie_saves += 1
        except OSError as e:
            log.error("could not save the trie to %s: %s", self.trie_path, e)

    def _shutdown(self) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for req in pending:
            self._send(req, req.finished("cancelled"))
        for req in self.slots:
            if req is not None:
                self._free(req, "cancelled")
        if self.trie_path is not None:
            self._save_trie()

    def _send(self, req: Request, event) -> None:
        try:
            req.sink(event)
        except Exception:  # a sink that fails (its client gone) must not stop the loop
            log.exception("request %d: sink failed", req.id)
            req.cancelled = True

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [r for r in self._pending if r.cancelled]
            for req in gone:
                self._pending.remove(req)
        for req in gone:
            self.stats.cancelled += 1
            self._send(req, req.finished("cancelled"))
        for req in self.slots:
            if req is not None and req.cancelled:
                self._free(req, "cancelled")

    def _free(self, req: Request, reason: str, error: str | None = None) -> None:
        """End a running request: its slot, its trie-local counts and drafter state go at once."""
        self.slots[req.row] = None
        self.cache.lens[req.row] = 0
        req.row = None
        if self.drafter is not None:
            self.drafter.end_request(req.id)
        if reason == "cancelled":
            self.stats.cancelled += 1
        elif reason == "error":
            self.stats.failed += 1
        else:
            self.stats.finished += 1
        self.stats.completion_tokens += len(req.output)
        self._send(req, req.finished(reason, error))

    def _admit(self) -> None:
        """Prefill queued requests into free rows (lowest first, so the step's rows stay few)."""
        while True:
            with self._cond:
                free = next((r for r, req in enumerate(self.slots) if req is None), None)
                if free is None or not self._pending:
                    return
                req = self._pending.popleft()
            req.row = free
            self.slots[free] = req
            self.stats.prompt_tokens += len(req.prompt)
            try:
                if self.drafter is not None:
                    self.drafter.begin_request(req.id, req.prompt)
                ids = torch.tensor([req.prompt], device=self.model.device)
                lengths = torch.tensor([len(req.prompt)], device=self.model.device)
                logits = self.model.prefill(ids, lengths, self.cache.rows(free, free + 1))  # (1, V)
                first = RowChooser([req])(logits[:, None], lengths[:, None])[0, 0].item()
                self._commit(req, [first])
            except Exception as e:
                log.exception("request %d failed in prefill", req.id)
                self._free(req, "error", f"{type(e).__name__}: {e}")

    def _step(self) -> None:
        """One verify step over rows [0, last busy row]; a step that raises is retried row by row, so only the
        rows that fail alone fail."""
        n = max(r for r, req in enumerate(self.slots) if req is not None) + 1
        requests = self.slots[:n]
        drafts = self._drafts(requests)
        top_k = self.config.recycle_top_k if self.config is not None else 0
        lens = self.cache.lens.clone()
        try:
            results = self._verify(0, n, requests, drafts, top_k)
        except Exception:
            log.exception("a step of %d rows failed: retrying its rows one by one", n)
            self.cache.lens.copy_(lens)  # the step wrote only scratch slots past each row's length
            results = [None] * n
            for b, req in enumerate(requests):
                if req is None:
                    continue
                try:
                    results[b] = self._verify(b, b + 1, [req], drafts[b:b + 1], top_k)[0]
                except Exception as e:
                    self.cache.lens[b] = lens[b]
                    self._free(req, "error", f"{type(e).__name__}: {e}")
        self.stats.steps += 1
        busy = sum(r is not None for r in requests)
        self.stats.row_steps += busy
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, busy)
        for b, req in enumerate(requests):
            if req is None or results[b] is None or req.row is None:
                continue
            req.draft_tokens += drafts[b].num_draft
            try:
                self._commit(req, *read_step_row(results[b], drafts[b].tokens, top_k))
            except Exception as e:
                log.exception("request %d failed in commit", req.id)
                self._free(req, "error", f"{type(e).__name__}: {e}")

    def _drafts(self, requests: list[Request | None]):
        """Every row's draft tree, priced together; a drafter that fails drafts nothing this step (a plain step
        is always valid)."""
        proposals = [([], [])] * len(requests)
        if self.drafter is not None:
            ids = [req.id if req is not None else -1 for req in requests]
            contexts = [req.context if req is not None else None for req in requests]
            try:
                proposals = self.drafter.draft_batch(ids, contexts, batch_size=len(requests))
            except Exception:
                log.exception("drafting failed: plain step")
        layout = self.config.layout if self.config is not None else "hier"
        return draft_trees([req.context[-1] if req is not None else 0 for req in requests], proposals, layout)

    def _verify(self, start: int, stop: int, requests, drafts, top_k: int) -> list[list[int]]:
        batch = pack_drafts(drafts, self.model.device)
        active = torch.tensor([int(r is not None) for r in requests], device=self.model.device)
        return tree_step(self.model, self.cache, RowChooser(requests), batch.tokens, batch.parents, batch.depths,
                         batch.tree_mask, active, top_k=top_k, rows=(start, stop)).tolist()

    def _commit(self, req: Request, new: list[int], predictions: dict | None = None) -> None:
        """Append accepted tokens, cut at eos, a stop string or max_tokens (as generate's DecodeState.commit)."""
        new, reason = cut_new_tokens(new, req.context, len(req.prompt), req.params.max_tokens, self.eos, req.stops)
        req.context += new
        req.steps += 1
        if self.drafter is not None:
            self.drafter.update(req.id, new, predictions)
        self._send(req, Tokens(new))
        if reason is not None:
            self._free(req, reason)
