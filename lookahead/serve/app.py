"""`lookahead serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine's scheduler.

The HTTP side never touches torch: it tokenizes, hands requests to the `Scheduler` (whose decode thread owns the
model) and turns the events of each step, delivered in one call per step, into responses.

Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template), GET /v1/models,
GET /health, GET /metrics (Prometheus), GET /v1/stats. With an API key every /v1 route needs
`Authorization: Bearer KEY` (401 otherwise, compared in constant time), as vLLM's --api-key. With several keys
each is a tenant, and a request drafts only from its own tenant's history (and `cache_salt`'s: the pool is
(tenant, salt); docs/tenants.md). `stream: true` sends server-sent events in OpenAI's chunk format ending with
`data: [DONE]`. Settings: max_tokens, temperature (0 = greedy), top_p, seed, stop, n=1. `usage` carries the
OpenAI counts plus `usage.lookahead = {steps, accepted_tokens_per_step, draft_tokens_per_step}`: the forward
passes that produced the request's tokens (the prefill included, so plain decoding has exactly 1.0 tokens per
step), completion tokens per step, and draft nodes verified per step.

Errors are OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed body, a bad
setting or a prompt beyond the context, 401 without the API key, 404 for an unknown model, 503 when the queue is
full or the server is stopping, 504 for a request past --request-timeout, 500 only for a request that failed
inside the engine (it fails alone).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import socket
import threading
import time
import uuid
from functools import partial
from typing import Any, Literal

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:
    raise ModuleNotFoundError(f"lookahead serve needs the serve extra ({e.name} is missing): "
                              "pip install -e '.[serve]'") from e

from lookahead.engine.engine import StopStrings
from lookahead.engine.sampling import SamplingParams
from lookahead.serve.metrics import Metrics
from lookahead.serve.scheduler import ContextTooLong, EngineClosed, Finished, QueueFull, Scheduler, Tokens

log = logging.getLogger("lookahead.serve")

MAX_STOP_STRINGS = 4  # as OpenAI
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
STOPPED = "the server stopped before the request finished"
TIMED_OUT = "the request ran past the server's --request-timeout"
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
MAX_CACHE_SALT_BYTES = 256  # a cache_salt's UTF-8 length limit (docs/tenants.md)
TENANT = "lookahead.tenant"  # the ASGI scope key the key check stores the request's tenant under


# ---- request bodies ----------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Settings(BaseModel):
    """What both endpoints take. Unknown fields are refused (400), as OpenAI does."""
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id: recorded nowhere, and never a drafting pool
    cache_salt: Any = None  # vLLM's: only requests of one tenant with one salt share drafting history
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Settings):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # OpenAI's; another is a 400 naming these
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Settings):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None


# ---- errors ------------------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, f"the request body is not valid JSON: {first.get('msg', '')}",
                              code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return error_response(400, "the request needs a JSON body", code="invalid_json")
    param = ".".join(loc) or None
    return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)


def _unsupported(body: _Settings) -> None:
    """400 for the OpenAI settings this server does not implement, when set to anything but their default."""
    checks = [("n", body.n != 1, "only n=1 is supported"),
              ("presence_penalty", body.presence_penalty != 0, "presence_penalty is not supported (use 0)"),
              ("frequency_penalty", body.frequency_penalty != 0, "frequency_penalty is not supported (use 0)"),
              ("logit_bias", bool(body.logit_bias), "logit_bias is not supported"),
              ("logprobs", bool(body.logprobs), "logprobs are not supported")]
    if isinstance(body, CompletionRequest):
        checks += [("echo", body.echo, "echo is not supported"),
                   ("best_of", body.best_of not in (None, 1), "only best_of=1 is supported"),
                   ("suffix", bool(body.suffix), "suffix is not supported")]
    for param, bad, message in checks:
        if bad:
            raise APIError(400, message, param=param)


def _cache_salt(salt) -> str | None:
    """400 unless the body's cache_salt is absent or a non-empty string of at most MAX_CACHE_SALT_BYTES."""
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        got = "an empty string" if salt == "" else f"a JSON {type(salt).__name__}"
        raise APIError(400, f"cache_salt must be a non-empty string, got {got}", param="cache_salt")
    size = len(salt.encode("utf-8", "surrogatepass"))
    if size > MAX_CACHE_SALT_BYTES:
        raise APIError(400, f"cache_salt is {size} bytes (UTF-8): at most {MAX_CACHE_SALT_BYTES} are allowed",
                       param="cache_salt")
    return salt


def tenant_keys(api_key: str | list[str] | None = None, api_keys: dict[str, str] | None = None) -> dict[str, str]:
    """{tenant name: key} of every key given: api_key (one, or a list named key1, key2, ... in order) and api_keys
    (named). ValueError for an empty key, a key given twice or a name used twice."""
    keys = [api_key] if isinstance(api_key, str) and api_key else list(api_key or [])
    named = [(f"key{i}", key) for i, key in enumerate(keys, start=1)] + list((api_keys or {}).items())
    out: dict[str, str] = {}
    for name, key in named:
        if not isinstance(key, str) or not key or key != key.strip():
            raise ValueError(f"API key {name!r} must be a non-empty string without surrounding whitespace")
        if name in out:
            raise ValueError(f"two API keys are named {name!r}: give each tenant its own name")
        if key in out.values():
            raise ValueError(f"API key {name!r} is also another tenant's key: give each tenant its own key")
        out[name] = key
    return out


def read_api_keys(path: str) -> dict[str, str]:
    """`--api-keys FILE`: one `name:key` a line (blank lines and lines starting with # skipped) -> {name: key}."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, key = line.partition(":")
            if not sep or not name.strip() or not key.strip():
                raise ValueError(f"{path} line {number}: expected 'name:key'")
            if name.strip() in out:
                raise ValueError(f"{path} line {number}: the name {name.strip()!r} is used twice")
            out[name.strip()] = key.strip()
    if not out:
        raise ValueError(f"{path} holds no 'name:key' line")
    return out


def _stop_strings(stop) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    return tuple(stops)


# ---- text ----------------------------------------------------------------------------------------------------------
def decode(tokenizer, ids: list[int]) -> str:
    """Output text: special tokens (eos) dropped, no space clean-up, so that a prefix's text is a prefix."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class TextStream:
    """A request's text as its tokens arrive, detokenised incrementally: each push decodes only the tokens since
    the last complete piece (vLLM's prefix/read offsets: O(new tokens), never the whole output). Each piece handed
    out is final: text ending in a partial UTF-8 character or in the start of a stop string is held back, so the
    pieces concatenate to the whole text, cut before the first stop string (OpenAI leaves it out).

    The server's one detokenizer per request: it finds the stop strings (as vLLM v1's output processor does; the
    engine never sees them), and `kept` is then the number of tokens up to the one that completed the first
    (`StopStrings.first_stop`, generate's cut); tokens pushed after it are ignored."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.stop_strings = StopStrings(list(stops), tokenizer, decode=partial(decode, tokenizer)) if stops else None
        self.kept: int | None = None
        self.ids: list[int] = []
        self.prefix = self.read = 0  # decode window: ids[prefix:read] is text already in self.decoded
        self.decoded = ""
        self.stop_at: int | None = None  # where the first stop string starts in self.decoded
        self.sent = 0  # characters handed out
        self.longest_stop = max((len(s) for s in stops), default=0)

    def _decode_new(self, final: bool) -> None:
        window = decode(self.tokenizer, self.ids[self.prefix:])
        known = decode(self.tokenizer, self.ids[self.prefix:self.read])
        if len(window) > len(known) and (final or not window.endswith("\ufffd")):
            searched = max(0, len(self.decoded) - self.longest_stop + 1)
            self.decoded += window[len(known):]
            start, self.prefix, self.read = self.read, self.read, len(self.ids)
            if self.stop_at is None and self.stops:
                hits = [i for i in (self.decoded.find(s, searched) for s in self.stops) if i >= 0]
                self.stop_at = min(hits) if hits else None
                if self.stop_at is not None:  # completed by one of the tokens whose text was new
                    j = self.stop_strings.first_stop(self.ids[:start], self.ids[start:])
                    self.kept = start + j + 1 if j is not None else len(self.ids)

    def push(self, tokens: list[int]) -> str:
        if self.kept is not None:
            return ""  # the text ended at its stop string
        self.ids += tokens
        self._decode_new(final=False)
        if self.stop_at is not None:
            return self._advance(self.stop_at)
        text = self.decoded
        held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._advance(len(text) - held)

    def finish(self) -> str:
        self._decode_new(final=True)
        return self._advance(self.stop_at if self.stop_at is not None else len(self.decoded))

    def _advance(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.decoded[self.sent:end], end
        return piece


class _Guard:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from the endpoints): the
    API key check of /v1 routes, which also names the request's tenant (scope[TENANT]): the key's name where there
    are several keys, None where there is at most one (one tenant: the shared trie)."""

    def __init__(self, app, expected: dict[str, bytes]):
        self.app, self.expected = app, expected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            if self.expected and scope["path"].startswith("/v1"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                tenant = None
                for name, header in self.expected.items():  # every key compared: the time names none of them
                    if hmac.compare_digest(given, header):
                        tenant = name
                scope[TENANT] = tenant if len(self.expected) > 1 else None
                if tenant is None:
                    response = error_response(401, "Incorrect API key provided: send it as 'Authorization: "
                                              "Bearer KEY'", code="invalid_api_key")
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def usage(fin: Finished) -> dict:
    return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
            "total_tokens": fin.prompt_tokens + fin.completion_tokens,
            "lookahead": {"steps": fin.steps, "accepted_tokens_per_step": fin.accepted_per_step,
                          "draft_tokens_per_step": fin.draft_tokens / max(fin.steps, 1)}}


def stopped(text: TextStream, event: Tokens | Finished, prompt_tokens: int) -> Finished | None:
    """The request's end once its text reached a stop string: reason "stop", its tokens counted up to the one that
    completed it, its steps and drafts as of the event that brought it (None while no stop string was found)."""
    if text.kept is None:
        return None
    return Finished("stop", prompt_tokens, text.kept, event.steps, event.draft_tokens)


def _sse(data) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


# ---- the app -----------------------------------------------------------------------------------------------------
def create_app(scheduler: Scheduler, tokenizer, model_name: str, api_key: str | None = None,
               metrics: Metrics | None = None, api_keys: dict[str, str] | None = None) -> FastAPI:
    """The HTTP front of a started scheduler; `tokenizer` encodes prompts and decodes outputs (on the event loop).
    api_key: required as `Authorization: Bearer KEY` on every /v1 route. api_keys: {tenant name: key}, any of which
    is accepted; with more than one, each names a tenant whose drafting history is its own (docs/tenants.md).
    metrics: what GET /metrics renders."""
    app = FastAPI(title="lookahead", description="OpenAI-compatible server with lossless lookahead decoding")
    created = int(time.time())
    expected = {name: f"Bearer {key}".encode() for name, key in tenant_keys(api_key, api_keys).items()}
    loop_holder: list[asyncio.AbstractEventLoop] = []

    def dispatch(events) -> None:
        """On the event loop: one step's events into their requests' queues."""
        for req, event in events:
            req.sink(event)

    def deliver_on_loop(events) -> None:
        """On the decode thread: one wake-up of the event loop per step, for every request at once."""
        loop = loop_holder[0]
        if not loop.is_closed():  # after the HTTP server stopped, nobody is left to read the events
            loop.call_soon_threadsafe(dispatch, events)

    def bind_loop() -> None:
        """Events go to this event loop from the first request on (the loop exists only once the server runs)."""
        if not loop_holder:
            loop_holder.append(asyncio.get_running_loop())
            scheduler.deliver = deliver_on_loop

    app.add_middleware(_Guard, expected=expected)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return _validation_error(exc)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code=str(exc.status_code))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **scheduler.load()}

    @app.get("/metrics")
    async def prometheus_metrics():
        if metrics is None:
            raise APIError(404, "this server keeps no metrics", code="404")
        return Response(metrics.render(), media_type=Metrics.CONTENT_TYPE)

    @app.get("/v1/stats")
    async def stats():
        return {**scheduler.stats.as_dict(), **scheduler.load(), "max_batch": scheduler.max_batch,
                "max_context": scheduler.max_context, "lookahead": scheduler.config is not None,
                "trie_nodes": len(scheduler.trie), **scheduler.pools_stats(), "free_rows": scheduler.engine.free_rows(),
                "drafting_requests": scheduler.engine.drafting_requests(), "memory_bytes": scheduler.memory()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lookahead", "max_model_len": scheduler.max_context}]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_name}`",
                           param="model", code="model_not_found")

    def settings(body: _Settings, prompt_len: int, default_max: int | None) -> SamplingParams:
        _unsupported(body)
        max_tokens = body.max_tokens
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else max(1, scheduler.max_context - prompt_len)
        seed = None if body.seed is None else body.seed % 2**64
        if body.temperature > 0:
            sampling = SamplingParams(do_sample=True, temperature=body.temperature, top_p=body.top_p, seed=seed)
        else:
            sampling = SamplingParams()
        return max_tokens, sampling, _stop_strings(body.stop), _cache_salt(body.cache_salt)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (n=1)", param="prompt")
            prompt = prompt[0]
        ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        params = settings(body, len(ids), COMPLETIONS_DEFAULT_MAX_TOKENS)
        return await respond(request, body, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                     "".join(part.text for part in m.content or [])} for m in body.messages]
        try:
            ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
                "input_ids"])
        except Exception as e:  # the template refuses this conversation (e.g. an unknown role order)
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        params = settings(body, len(ids), None)
        return await respond(request, body, ids, params, chat=True)

    async def respond(request: Request, body: _Settings, ids: list[int], params, chat: bool):
        max_tokens, sampling, stop, salt = params
        tenant = request.scope.get(TENANT)
        pool = None if tenant is None and salt is None else (tenant, salt)  # None: the shared trie (one tenant)
        bind_loop()  # before the request's first event can be delivered
        events: asyncio.Queue = asyncio.Queue()
        try:
            req = scheduler.submit(ids, max_tokens, sampling, events.put_nowait, pool=pool)
        except QueueFull as e:
            raise APIError(503, str(e), type="server_error", code="queue_full") from None
        except EngineClosed as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        except ContextTooLong as e:
            raise APIError(400, str(e), param="messages" if chat else "prompt",
                           code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model}
        text = TextStream(tokenizer, stop)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(req, events, text, head, chat, include_usage, len(ids)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(cancel_on_disconnect(request, req))
        pieces = []
        try:
            while True:
                event = await events.get()
                if isinstance(event, Tokens):
                    pieces.append(text.push(event.tokens))
                    end = stopped(text, event, len(ids))
                    if end is None:
                        continue
                    await stop_and_settle(req, events, text.kept)
                elif event.reason == "error":
                    raise APIError(500, f"the request failed while decoding: {event.error}", type="server_error")
                elif event.reason == "cancelled":  # its client went away, or the server stopped under it
                    if req.cancelled:
                        return Response(status_code=499)
                    raise APIError(503, STOPPED, type="server_error", code="shutting_down")
                elif event.reason == "timeout":
                    raise APIError(504, TIMED_OUT, type="server_error", code="timeout")
                else:
                    pieces.append(text.finish())
                    end = stopped(text, event, len(ids)) or event
                content = "".join(pieces)
                choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                           "finish_reason": end.reason} if chat else
                          {"index": 0, "text": content, "logprobs": None, "finish_reason": end.reason})
                return {**head, "choices": [choice], "usage": usage(end)}
        finally:
            watcher.cancel()

    async def stop_and_settle(req, events: asyncio.Queue, keep: int) -> None:
        """A stop string ended the text: end the request there and wait for the scheduler's Finished (at the next
        step boundary: its row is free and its counts settled when the response goes out), dropping the tokens the
        engine committed past the stop."""
        scheduler.stop(req, keep)
        while not isinstance(await events.get(), Finished):
            pass

    async def cancel_on_disconnect(request: Request, req) -> None:
        """Free a non-streamed request's row once its client has gone (Starlette cancels a stream's generator
        itself)."""
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        scheduler.cancel(req)

    async def stream(req, events: asyncio.Queue, text: TextStream, head: dict, chat: bool, include_usage: bool,
                     prompt_tokens: int):
        """SSE chunks; a client that disconnects cancels this generator, whose `finally` frees the row."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(piece: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

        try:
            if chat:
                yield chunk(None, role=True)
            while True:
                event = await events.get()
                if isinstance(event, Tokens):
                    piece = text.push(event.tokens)
                    if piece:
                        yield chunk(piece)
                    end = stopped(text, event, prompt_tokens)
                    if end is None:
                        continue
                    await stop_and_settle(req, events, text.kept)
                elif event.reason in ("error", "cancelled", "timeout"):
                    message = {"error": f"the request failed while decoding: {event.error}", "cancelled": STOPPED,
                               "timeout": TIMED_OUT}[event.reason]
                    yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
                    yield "data: [DONE]\n\n"
                    return
                else:
                    piece = text.finish()
                    if piece:
                        yield chunk(piece)
                    end = stopped(text, event, prompt_tokens) or event
                yield chunk(None, finish=end.reason)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(end)})
                yield "data: [DONE]\n\n"
                return
        finally:
            scheduler.cancel(req)  # a no-op once it finished

    return app


# ---- running it ----------------------------------------------------------------------------------------------------
class BackgroundServer:
    """Serve a scheduler on host:port from a thread of this process (tests, notebooks). port 0 = a free port;
    `url` is the base URL (…/v1 for the openai client). `close()` stops uvicorn, then the scheduler (which saves
    the trie)."""

    def __init__(self, scheduler: Scheduler, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", api_key: str | None = None, api_keys: dict[str, str] | None = None):
        import uvicorn

        self.scheduler = scheduler.start()
        self.metrics = scheduler.metrics
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(create_app(scheduler, tokenizer, model_name, api_key, scheduler.metrics, api_keys),
                                log_level=log_level, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="lookahead-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        self.scheduler.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def add_arguments(p) -> None:
    from lookahead.models.auto import DTYPE_HELP, DTYPES

    model = p.add_argument_group("the model and how it runs")
    model.add_argument("--model", required=True, help="HF checkpoint dir, .gguf file, or smollm2-135m-instruct")
    model.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    model.add_argument("--dtype", choices=list(DTYPES), default="auto", help=DTYPE_HELP)
    model.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    model.add_argument("--threads", type=int, default=None,
                       help="torch threads of the decode thread (default: torch's, the physical cores)")
    model.add_argument("--no-lookahead", action="store_true", help="plain one-token decoding")

    capacity = p.add_argument_group("requests and the KV cache")
    capacity.add_argument("--max-batch", type=int, default=16,
                          help="rows of the KV cache: requests decoded together. KV cache bytes = max-batch x "
                               "(max-context + 128) x layers x 2 x kv heads x head dim x dtype bytes (SmolLM2-135M "
                               "fp32: 45 KB per token, 1.6 GB at 16 x 2048); memory by part: GET /v1/stats")
    capacity.add_argument("--max-queue", type=int, default=256, help="requests waiting for a row before 503s")
    capacity.add_argument("--max-context", type=int, default=None,
                          help="tokens per row, prompt + completion (default: the model's context, at most 2048); "
                               "sizes the KV cache with --max-batch")
    capacity.add_argument("--prefill-chunk", type=int, default=None,
                          help="prompt tokens one decode step carries beside the running requests (CPU: new prompts "
                               "ride in the steps in chunks; default 128): smaller keeps time per output token "
                               "flatter while requests arrive, larger gives the first token sooner")
    capacity.add_argument("--request-timeout", type=float, default=None,
                          help="seconds after which a request ends with 504 / a timeout error (default: none)")

    drafting = p.add_argument_group("the drafting memory (tries)")
    drafting.add_argument("--trie", default=None, metavar="PATH",
                          help="load the shared trie from PATH at start (missing = empty), save it there at shutdown")
    drafting.add_argument("--trie-save-minutes", type=float, default=10.0,
                          help="also save the trie this often (0 = never)")
    drafting.add_argument("--max-trie-nodes", type=int, default=1 << 20,
                          help="the shared trie's bound, request-local prompt windows included (at most 1.1x it): "
                               "about 52 bytes per node, 55 MB at the default 1048576")
    drafting.add_argument("--max-pool-nodes", type=int, default=None,
                          help="one drafting pool's trie bound (a tenant's or cache_salt's history; default: a "
                               "quarter of --max-trie-nodes, the bound of all pools together; docs/tenants.md)")

    tenants = p.add_argument_group("API keys: each key a tenant with its own drafting history")
    tenants.add_argument("--api-key", action="append", default=None,
                         help="require 'Authorization: Bearer KEY' on every /v1 route (default: $LOOKAHEAD_API_KEY, "
                              "else none); give it several times for several tenants, each drafting only from its "
                              "own history (docs/tenants.md)")
    tenants.add_argument("--api-keys", default=None, metavar="FILE",
                         help="tenants' keys, one 'name:key' a line (with --api-key's: every key is a tenant); names "
                              "are never reported")

    server = p.add_argument_group("the HTTP server and the process")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGINT/SIGTERM, seconds to let running requests finish before they are cancelled")
    server.add_argument("--no-malloc-trim", action="store_true",
                        help="keep what the C allocator frees instead of handing it back when the server goes idle")
    server.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args) -> int:
    """Load the model on the decode thread, serve until SIGINT/SIGTERM (running requests finish, up to
    --shutdown-timeout), then save the trie."""
    import os

    import uvicorn
    from transformers import AutoTokenizer

    from lookahead.models.auto import load_model
    from lookahead.models.checkpoint import resolve_checkpoint

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    keys = tenant_keys(args.api_key or os.environ.get("LOOKAHEAD_API_KEY") or None,
                       read_api_keys(args.api_keys) if args.api_keys else None)
    scheduler = Scheduler(lambda: load_model(args.model, args.dtype, args.device)[0], max_batch=args.max_batch,
                          max_context=args.max_context, max_queue=args.max_queue,
                          lookahead=None if args.no_lookahead else True, max_trie_nodes=args.max_trie_nodes,
                          trie_path=args.trie, trie_save_minutes=args.trie_save_minutes,
                          request_timeout=args.request_timeout, threads=args.threads, metrics=True,
                          trim_allocator=not args.no_malloc_trim, prefill_chunk=args.prefill_chunk,
                          max_pool_nodes=args.max_pool_nodes)
    scheduler.start()  # the decode thread resolves (converts once) and loads the checkpoint
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(args.model))  # the converted dir: no torch work
    name = args.served_model_name or args.model
    log.info("serving %s on http://%s:%d/v1 (max batch %d, context %d, lookahead %s, trie %s, threads %s, api keys %d)",
             name, args.host, args.port, scheduler.max_batch, scheduler.max_context,
             "on" if scheduler.config else "off", args.trie or "-", args.threads or "default", len(keys))
    def stop(signum, frame):
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again under the handlers it found:
    # these, so that the trie is still saved below instead of the process dying there
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        uvicorn.run(create_app(scheduler, tokenizer, name, metrics=scheduler.metrics, api_keys=keys), host=args.host,
                    port=args.port, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout)
    except SystemExit:
        pass
    finally:
        scheduler.close()
    return 0
