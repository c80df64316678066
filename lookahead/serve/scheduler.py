"""The server's side of the engine: requests in, tokens out, around one `Engine` on one thread.

`Scheduler` owns the decode thread. Everything torch does in a server process happens there: loading the model
(when given a loader), packing its weights, the quick cost prior, every prefill and step (torch's OpenMP pool
is per thread: a second thread doing torch work would bring a second pool of spinning workers onto the same
cores). Other threads only queue requests, flag them cancelled and read counters.

Between two steps the thread drops cancelled and timed-out requests, admits queued ones into free rows, and saves
the trie when it is due; then one `Engine.step` runs over the busy rows. On CPU an admitted request's prompt rides
in the steps (`Engine.add(defer=True)`: at most `prefill_chunk` prompt tokens per step beside the running rows'
trees, vLLM v1's chunked prefill), so a new request neither waits for the running ones nor stalls them; elsewhere
it is prefilled at admission (one forward per run of consecutive rows). The events of a whole step (each request's new tokens, and `Finished` for those that ended) go out in
one `deliver` call, so an event loop wakes once per step, not once per row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lookahead.config import LookaheadConfig
from lookahead.engine.engine import PREFILL_CHUNK_TOKENS, ContextTooLong, Engine, Sequence, context_limit
from lookahead.serve.memory import (SUFFIX_TOKEN_BYTES, TRIE_NODE_BYTES, model_memory_bytes, rss_bytes, trim_allocator,
                              workspace_bytes)
from lookahead.drafting.pools import DraftPools
from lookahead.drafting.trie import TokenTrie
from lookahead.engine.sampling import SamplingParams

log = logging.getLogger("lookahead.serve")

DEFAULT_MAX_CONTEXT = 2048  # tokens per row (prompt + completion) unless --max-context says otherwise


class QueueFull(Exception):
    """More requests are waiting for a row than the scheduler queues (HTTP 503)."""


class EngineClosed(Exception):
    """The server is shutting down and takes no new requests (HTTP 503)."""


# Prompt tokens one server step carries beside the running rows' trees: TTFT against TPOT, docs/benchmarks.md#serve_prefill_chunk
SERVE_PREFILL_CHUNK = 128

@dataclass
class Tokens:
    """Event: tokens committed by one step (or the prefill), in order, and the request's counts after them (forward
    passes, draft nodes verified): a stop string found in them ends the request's response here."""
    tokens: list[int]
    steps: int = 0
    draft_tokens: int = 0


@dataclass
class Finished:
    """Event, the last one: why the request ended ("stop", "length", "cancelled", "timeout", "error") and its
    counts."""
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
class SchedulerStats:
    """Counters since start; `max_batch_seen` is the most requests that shared one step."""
    steps: int = 0
    row_steps: int = 0  # sum over steps of the requests in the step
    max_batch_seen: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0
    rejected: int = 0
    trie_saves: int = 0
    allocator_trims: int = 0  # times the C allocator handed its free memory back when the server went idle

    def as_dict(self) -> dict:
        return {**self.__dict__, "mean_batch": self.row_steps / max(self.steps, 1)}


class Request:
    """One request: a `Sequence` for the engine, the sink its events go to, and its deadline. Made by
    `Scheduler.submit`; after that only the decode thread touches it, except `cancelled`."""

    def __init__(self, seq: Sequence, sink: Callable[[object], None], deadline: float | None):
        self.seq, self.sink, self.deadline = seq, sink, deadline
        self.cancelled = False
        self.keep: int | None = None  # set by `Scheduler.stop`: the output's tokens up to its stop string
        self.submitted = time.monotonic()
        self.first_token_s: float | None = None

    @property
    def id(self) -> int:
        return self.seq.request_id

    @property
    def output(self) -> list[int]:
        return self.seq.output

    def finished(self, reason: str, error: str | None = None) -> Finished:
        seq = self.seq
        return Finished(reason, len(seq.prompt), len(seq.output), seq.steps, seq.draft_tokens, error)


class Scheduler:
    """The decode thread of a server. `submit` queues a request (QueueFull past `max_queue` waiting, EngineClosed
    after `close`); its sink then receives Tokens events and one Finished event.

    model: a loaded model, or a zero-argument function that loads one on the decode thread (the server's way:
    then no torch work happens anywhere else). lookahead: the drafting settings; True = the defaults for the
    model's trie (`LookaheadConfig.for_trie`); None for plain decoding.
    trie_path: the shared trie is loaded from there at start (a missing file starts it empty) and saved there,
    atomically, every `trie_save_minutes` (0 = only at close) and at close. request_timeout: seconds from submit
    after which a request ends with reason "timeout" (None = never). threads: torch threads of the decode thread
    (None = torch's default). metrics: keep Prometheus metrics (`self.metrics`, for GET /metrics). Stop strings
    are the HTTP side's: its text stream finds them and calls `stop`. max_trie_nodes: the shared trie's bound
    (request-local windows included), set on a loaded trie too (None = the trie's own). trim_allocator: hand the C
    allocator's free memory back to the OS whenever the last request leaves. prefill_chunk: prompt tokens one step
    carries beside the running rows (all admitted requests together; SERVE_PREFILL_CHUNK by default): smaller keeps
    the running rows' time per token flatter while prompts arrive, larger gives new requests their first token sooner.
    max_pool_nodes: one drafting pool's trie bound (`lookahead.drafting.pools`; None = its default share of
    max_trie_nodes, which bounds the shared trie and every pool together). Only the shared trie is saved to trie_path: pools are
    never written anywhere (docs/tenants.md).
    """

    def __init__(self, model, *, max_batch: int = 16, max_context: int | None = None, max_queue: int = 256,
                 lookahead: LookaheadConfig | bool | None = True, trie_path: str | Path | None = None,
                 trie_save_minutes: float = 10.0, request_timeout: float | None = None, threads: int | None = None,
                 max_trie_nodes: int | None = None, metrics: bool = False, trim_allocator: bool = True,
                 prefill_chunk: int | None = None, max_pool_nodes: int | None = None):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if max_context is not None and (not isinstance(max_context, int) or max_context < 2):
            raise ValueError(f"max_context must be an int >= 2, got {max_context!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
        if trie_save_minutes < 0:
            raise ValueError(f"trie_save_minutes must be >= 0, got {trie_save_minutes!r}")
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds (or None), got {request_timeout!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be an int >= 1 (prompt tokens per step), got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk if prefill_chunk is not None else SERVE_PREFILL_CHUNK
        self._model_or_loader = model
        self.max_batch, self.max_queue, self._max_context = max_batch, max_queue, max_context
        self.config = lookahead
        self.trie_path = Path(trie_path) if trie_path is not None else None
        self.save_every_s = trie_save_minutes * 60.0
        self.request_timeout, self.threads = request_timeout, threads
        self.trim_allocator, self.max_trie_nodes = trim_allocator, max_trie_nodes
        DraftPools(max_pool_nodes)  # ValueError for a bad bound, here rather than on the decode thread
        self.max_pool_nodes = max_pool_nodes
        self.metrics = None
        if metrics:
            from lookahead.serve.metrics import Metrics  # prometheus_client: the serve extra

            self.metrics = Metrics(self.load, self.memory, self.pools_stats)
        self.stats = SchedulerStats()
        self.deliver: Callable[[list[tuple[Request, object]]], None] = _deliver_now
        self.model = self.engine = None
        self.weights_bytes = 0  # model_memory_bytes, measured on the decode thread (at start and when idle)
        self._pending: deque[Request] = deque()
        self._running: list[Request] = []
        self._cond = threading.Condition()
        self._closing = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._next_save = time.monotonic() + self.save_every_s

    # ---- other threads ---------------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> Scheduler:
        """Start the decode thread and wait until it has the model and its engine (loaded there when a loader
        was given); an error while loading is raised here."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lookahead-decode", daemon=True)
            self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the decode thread did not get ready in time")
        if self._error is not None:
            raise self._error
        return self

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def submit(self, prompt: list[int], max_tokens: int, sampling: SamplingParams = SamplingParams(),
               sink: Callable[[object], None] = lambda event: None, pool=None) -> Request:
        """Queue a request; ValueError for bad settings, ContextTooLong for a prompt + max_tokens beyond the
        context of a row (`Sequence.check`, the engine's admission check). pool: its drafting pool, a hashable key
        (the HTTP side's (tenant, cache_salt)); None = the shared trie."""
        seq = Sequence(list(prompt), max_tokens, sampling, frozenset(self.model.config.eos_token_id), pool=pool)
        seq.check(self.model.config.vocab_size, self.max_context, "this server's context")
        deadline = time.monotonic() + self.request_timeout if self.request_timeout else None
        req = Request(seq, sink, deadline)
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._pending)} requests are already waiting for a slot: retry later")
            self._pending.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request at the next step boundary (no-op once it finished); its row frees then."""
        req.cancelled = True
        with self._cond:
            self._cond.notify()

    def stop(self, req: Request, keep: int) -> None:
        """The request's text reached a stop string (the server's text stream found it): it ends "stop" at the next
        step boundary, its output cut to its first `keep` tokens (no-op once it finished)."""
        req.keep = keep
        with self._cond:
            self._cond.notify()

    def load(self) -> dict:
        return {"running": len(self._running), "queued": len(self._pending)}

    def pools_stats(self) -> dict[str, int]:
        """The drafting pools (tenant and cache_salt histories) by count and trie nodes; never their keys."""
        pools = self.model.state.pools if self.model is not None else None
        return {"drafting_pools": len(pools) if pools is not None else 0,
                "pool_trie_nodes": pools.nodes() if pools is not None else 0}

    def memory(self) -> dict[str, int]:
        """Bytes by part (lookahead.serve.memory): weights (with any packed copy), KV cache, trie (request-local
        windows included), the running requests' suffix automata, the largest forward's workspace (an estimate
        from shapes), and the process's resident size now and at its peak."""
        engine = self.engine
        if engine is None:
            return {}
        drafting = engine.drafter is not None
        suffix_tokens = sum(len(s.context) + sum(len(r) + 1 for r in s.references) for s in engine.busy()) \
            if drafting else 0
        cfg, element = self.model.config, engine.cache.buffer.element_size()
        step_tokens = engine.max_batch * (engine.config.decoding_length + 1 if drafting else 1)
        keys = engine.cache.max_len
        rss, peak = rss_bytes()
        return {"weights": self.weights_bytes,
                "kv_cache": engine.cache.buffer.nbytes + engine.cache.lens.nbytes,
                "trie": (len(self.trie) + self.pools_stats()["pool_trie_nodes"]) * TRIE_NODE_BYTES,
                "suffix_automata": suffix_tokens * SUFFIX_TOKEN_BYTES,
                "workspace": max(workspace_bytes(cfg, engine.prefill_chunk + step_tokens if engine.prefill_in_steps
                                                 else PREFILL_CHUNK_TOKENS, keys, element),
                                 workspace_bytes(cfg, step_tokens, keys, element)),
                "rss": rss, "rss_peak": peak}

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread: requests still queued or running end "cancelled"; the trie is saved (trie_path)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- the decode thread -----------------------------------------------------------------------------------
    def _setup(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        loaded = self._model_or_loader
        self.model = loaded if isinstance(loaded, torch.nn.Module) else loaded()
        limit, _ = context_limit(self.model)
        max_context = min(DEFAULT_MAX_CONTEXT, limit) if self._max_context is None else self._max_context
        if max_context > limit:
            raise ValueError(f"max_context must be at most {limit} (the model's context), got {max_context}")
        if self.trie_path is not None:
            shape = self.config if isinstance(self.config, LookaheadConfig) else LookaheadConfig()
            self.model.trie = (TokenTrie.load(self.trie_path) if self.trie_path.exists() else
                               TokenTrie(shape.branch_length, shape.max_trie_nodes))
        self.trie = self.model.trie  # shared by every request (the drafter's), saved to trie_path
        if self.max_trie_nodes is not None:
            self.trie.max_trie_nodes = self.max_trie_nodes  # the configured bound, a loaded trie's too
        self.model.state.pools.configure(self.max_pool_nodes)  # the total: the trie's bound (max_trie_nodes)
        if self.config is True:
            self.config = LookaheadConfig.for_trie(self.trie)
        elif self.config is False:
            self.config = None
        self.engine = Engine(self.model, self.max_batch, max_context, self.config, isolate_failures=True,
                             prefill_chunk=self.prefill_chunk)
        self.weights_bytes = model_memory_bytes(self.model)

    def _run(self) -> None:
        try:
            self._setup()  # not under inference_mode: loading packs weights that must keep their version counters
        except BaseException as e:  # raised to start()'s caller
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        with torch.inference_mode():
            while True:
                if not (self._closing or self._pending or self._running):
                    self._idle()
                with self._cond:
                    while not (self._closing or self._pending or self._running):
                        self._cond.wait(self._seconds_to_save())
                        self._maybe_save_trie()
                    if self._closing:
                        break
                self._maybe_save_trie()
                out: list[tuple[Request, object]] = []
                try:
                    self._drop_expired(out)
                    self._admit(out)
                    if self._running:
                        self._step(out)
                except Exception as e:  # a bug must not kill the decode thread: the requests in flight fail
                    log.exception("the decode loop failed: failing its %d running requests", len(self._running))
                    for req in list(self._running):
                        self.engine.remove(req.seq, "error")
                        self._end(req, "error", out, f"{type(e).__name__}: {e}")
                if out:
                    self._deliver(out)
            out = []
            self._shutdown(out)
            self._deliver(out)

    def _idle(self) -> None:
        """The last request left: hand the allocator's free memory back (what long prefills' activations left in
        glibc's heaps stays resident otherwise; docs/serving.md#memory) and measure the weights again."""
        if self.trim_allocator and trim_allocator():
            self.stats.allocator_trims += 1
        self.weights_bytes = model_memory_bytes(self.model)

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

    def _deliver(self, out: list[tuple[Request, object]]) -> None:
        try:
            self.deliver(out)
        except Exception:  # a consumer that fails must not stop the decode thread
            log.exception("delivering %d events failed", len(out))

    def _end(self, req: Request, reason: str, out: list, error: str | None = None) -> None:
        """A request leaves (its row, if it had one, is already free): count it and send Finished."""
        if req in self._running:
            self._running.remove(req)
        counter = {"cancelled": "cancelled", "timeout": "timed_out", "error": "failed"}.get(reason, "finished")
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.stats.completion_tokens += len(req.output)
        if self.metrics is not None:
            self.metrics.finished(reason)
        out.append((req, req.finished(reason, error)))

    def _drop_expired(self, out: list) -> None:
        """Cancelled and timed-out requests leave, queued or running."""
        now = time.monotonic()

        def reason(req: Request) -> str | None:
            if req.keep is not None:
                return "stop"
            return "cancelled" if req.cancelled else "timeout" if req.deadline is not None and now > req.deadline \
                else None

        with self._cond:
            gone = [(r, why) for r in self._pending if (why := reason(r)) is not None]
            for req, _ in gone:
                self._pending.remove(req)
        gone += [(r, why) for r in list(self._running) if (why := reason(r)) is not None]
        for req, why in gone:
            self.engine.remove(req.seq, why)
            if why == "stop":  # what came after the stop string's token was never the response's
                del req.seq.context[len(req.seq.prompt) + req.keep:]
            self._end(req, why, out)

    def _admit(self, out: list) -> None:
        """Queued requests into the free rows, oldest first: their prompts ride in the next steps (CPU), or are
        prefilled now (one forward per run of rows)."""
        with self._cond:
            n = min(self.engine.free_rows(), len(self._pending))
            admitted = [self._pending.popleft() for _ in range(n)]
        if not admitted:
            return
        self._running += admitted
        for req in admitted:
            self.stats.prompt_tokens += len(req.seq.prompt)
            if self.metrics is not None:
                self.metrics.admitted(len(req.seq.prompt))
        # a prefill that fails fails its request alone
        events = self.engine.add([req.seq for req in admitted], defer=True)
        self._collect(admitted, events, out, from_step=False)

    def _step(self, out: list) -> None:
        t0 = time.perf_counter()
        rows = len(self._running)
        events = self.engine.step()
        self.stats.steps += 1
        self.stats.row_steps += rows
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, rows)
        if self.metrics is not None:
            self.metrics.step(time.perf_counter() - t0)
        self._collect(list(self._running), events, out, from_step=True)

    def _collect(self, requests: list[Request], events: list[tuple[Sequence, list[int]]], out: list,
                 from_step: bool) -> None:
        """Each request's new tokens of this step, then Finished for those that ended (or failed)."""
        by_seq = {req.seq: req for req in requests}
        now = time.monotonic()
        for seq, new in events:
            req = by_seq[seq]
            if new:
                if self.metrics is not None:  # a first token is a prefill's, whichever call made it
                    self.metrics.tokens(new, from_step and req.first_token_s is not None)
                if req.first_token_s is None:
                    req.first_token_s = now - req.submitted
                    if self.metrics is not None:
                        self.metrics.first_token(req.first_token_s)
                out.append((req, Tokens(new, seq.steps, seq.draft_tokens)))
        for req in requests:
            if req.seq.finished and req in self._running:
                self._end(req, req.seq.finish_reason, out, req.seq.error)

    def _shutdown(self, out: list) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for req in pending:
            self._end(req, "cancelled", out)
        for req in list(self._running):
            self.engine.remove(req.seq, "cancelled")
            self._end(req, "cancelled", out)
        if self.trie_path is not None:
            self._save_trie()


def _deliver_now(events: list[tuple[Request, object]]) -> None:
    """Without an event loop: each request's sink is called on the decode thread."""
    for req, event in events:
        try:
            req.sink(event)
        except Exception:  # a sink that fails (its client gone) must not stop the others
            log.exception("request %d: sink failed", req.id)
            req.cancelled = True
