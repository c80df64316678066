"""`lookahead serve` on the embedded SmolLM2 (fp32, CPU): the official openai client, concurrent requests against
their solo outputs, errors, disconnects, a request failing alone, the queue limit and trie persistence. Servers
run in threads of this process on free ports of 127.0.0.1 and stop at the end of their test or module."""

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from lookahead import LookaheadConfig
from lookahead.data import encode_prompt, spec_bench_first_turns
from lookahead.engine.sampling import TokenChooser
from lookahead.serve.app import BackgroundServer, decode
from lookahead.serve.scheduler import Scheduler
from lookahead.engine.state import GenerationState

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"
TIMEOUT = 120  # seconds any one HTTP call may take on a busy 2-core CPU


@contextlib.contextmanager
def fresh_state(model):
    """The model as a freshly started server process sees it (empty trie, no drafter statistics; the measured
    cost curve kept); the session's state comes back afterwards."""
    saved = model.state
    model.state = GenerationState(cost_curves=dict(saved.cost_curves), step_costs=saved.step_costs)
    try:
        yield
    finally:
        model.state = saved


@contextlib.contextmanager
def serving(smollm2, api_key=None, **scheduler_kwargs):
    model, tokenizer = smollm2
    with fresh_state(model):
        scheduler = Scheduler(model, metrics=True,
                              **{"max_batch": 8, "max_context": 512, **scheduler_kwargs})
        with BackgroundServer(scheduler, tokenizer, NAME, api_key=api_key) as server:
            yield server


@pytest.fixture(scope="module")
def server(smollm2):
    with serving(smollm2) as server:
        yield server


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def stats(server) -> dict:
    return httpx.get(server.url + "/v1/stats", timeout=TIMEOUT).json()


def solo(model, tokenizer, text: str, max_tokens: int, chat: bool = True, **sampling) -> tuple[list[int], str]:
    """The request run alone: model.generate without lookahead -> (output ids, text)."""
    ids = encode_prompt(tokenizer, text, chat)
    out = model.generate(ids, max_new_tokens=max_tokens, lookahead=False, **sampling)[0, ids.shape[1]:].tolist()
    return out, decode(tokenizer, out)


def chat(server, text: str, max_tokens: int, **kwargs):
    return client(server).chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}],
                                                  max_tokens=max_tokens, **kwargs)


def wait_until(predicate, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def read_until_content(lines, pieces: int = 1) -> None:
    """Read a chat stream's SSE lines until `pieces` chunks carried text: the request holds a row by then."""
    while pieces:
        line = next(lines)
        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            pieces -= 1


def test_openai_client_models_chat_and_completion_equal_solo_greedy(smollm2, server):
    model, tokenizer = smollm2
    assert [m.id for m in client(server).models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"

    ids, text = solo(model, tokenizer, "Name three fruits.", 16)
    r = chat(server, "Name three fruits.", 16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("stop" if ids[-1] in model.config.eos_token_id else "length")
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.prompt_tokens == encode_prompt(tokenizer, "Name three fruits.", True).shape[1]
    la = r.usage.lookahead
    assert la["steps"] >= 1 and la["accepted_tokens_per_step"] == pytest.approx(len(ids) / la["steps"])

    ids, text = solo(model, tokenizer, "The capital of France is", 12, chat=False)
    r = client(server).completions.create(model=NAME, prompt="The capital of France is", max_tokens=12,
                                          temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert r.usage.completion_tokens == len(ids) and r.usage.total_tokens == r.usage.prompt_tokens + len(ids)


def test_streamed_chat_concatenates_to_the_non_streamed_text(server):
    prompt = "Write one sentence about the sea."
    whole = chat(server, prompt, 20, temperature=0)
    chunks = list(chat(server, prompt, 20, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    with httpx.stream("POST", server.url + "/v1/completions", timeout=TIMEOUT,
                      json={"model": NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                            "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    pieces = [json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
    plain = client(server).completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert "".join(pieces) == plain.choices[0].text


def test_seeded_sampling_is_reproducible_and_equals_solo_sampling(smollm2, server):
    model, tokenizer = smollm2
    prompt = "Tell me a short story about a robot."
    settings = dict(temperature=0.8, top_p=0.9, seed=1234)
    first = chat(server, prompt, 16, **settings).choices[0].message.content
    again = chat(server, prompt, 16, **settings).choices[0].message.content
    assert first == again
    _, text = solo(model, tokenizer, prompt, 16, do_sample=True, **settings)
    assert first == text


def test_stop_strings_are_honoured(smollm2, server):
    model, tokenizer = smollm2
    _, text = solo(model, tokenizer, "Name three fruits.", 20)
    stop = text[text.index("\n") + 1:][:3]  # a piece from the middle of the output
    assert stop and text.index(stop) > 0
    r = chat(server, "Name three fruits.", 20, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].message.content == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    ids = encode_prompt(tokenizer, "Name three fruits.", True)
    cut = model.generate(ids, max_new_tokens=20, lookahead=False, stop_strings=[stop, "@@@"], tokenizer=tokenizer)
    assert r.usage.completion_tokens == cut.shape[1] - ids.shape[1] < 20  # the text stream cuts where generate does
    streamed = chat(server, "Name three fruits.", 20, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:text.index(stop)]
    assert stats(server)["running"] == 0  # the stopped requests left their rows before their responses ended


def test_concurrent_requests_equal_their_solo_greedy_outputs_and_share_steps(smollm2, server):
    model, tokenizer = smollm2
    prompts = [text for _, text in spec_bench_first_turns(1)[:8]]
    lengths = [8, 24, 12, 20, 10, 16, 22, 14]
    before = stats(server)

    def ask(i):
        return chat(server, prompts[i], lengths[i], temperature=0)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    after = stats(server)
    assert after["finished"] == before["finished"] + 8
    for prompt, n, reply in zip(prompts, lengths, replies):
        ids, text = solo(model, tokenizer, prompt, n)
        assert reply.choices[0].message.content == text
        assert reply.usage.completion_tokens == len(ids)
    assert after["running"] == 0 and after["queued"] == 0


def test_requests_queued_together_share_every_step_and_equal_generate(smollm2):
    """Eight requests queued before the decode thread looks: all are admitted at once and every step runs them
    together (no HTTP, no scheduling luck); each output equals generate() alone."""
    model, tokenizer = smollm2
    prompts = [encode_prompt(tokenizer, text, True)[0].tolist() for _, text in spec_bench_first_turns(1)[:8]]
    lengths = [8, 24, 12, 20, 10, 16, 22, 14]
    with fresh_state(model):
        # every prompt fits one step's prefill chunk: one step prefills all eight, then they decode together
        scheduler = Scheduler(model, max_batch=8, max_context=512, lookahead=None, prefill_chunk=4096).start()
        done = threading.Event()
        outputs = {}

        def sink_for(i):
            def sink(event):  # called on the decode thread
                if hasattr(event, "reason"):
                    outputs[i] = event
                    if len(outputs) == len(prompts):
                        done.set()
            return sink

        with scheduler._cond:  # the decode thread waits on this lock: it sees all eight at once
            requests = [scheduler.submit(p, n, sink=sink_for(i)) for i, (p, n) in enumerate(zip(prompts, lengths))]
        assert done.wait(TIMEOUT)
        stats = scheduler.stats
        scheduler.close()
    assert stats.max_batch_seen == 8 and stats.steps == 1 + max(lengths) - 1  # the prefill step gave each its first
    assert stats.row_steps == 8 + sum(n - 1 for n in lengths)                # token, then every step ran them all
    for i, (prompt, n, req) in enumerate(zip(prompts, lengths, requests)):
        assert outputs[i].reason == "length"
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=n, lookahead=False, eos_token_id=[])
        assert req.output == expected[0, len(prompt):].tolist()


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url = server.url + "/v1/chat/completions"
    ok = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}

    def post(body=None, content=None, path=url):
        r = httpx.post(path, json=body, content=content, timeout=TIMEOUT,
                       headers={"content-type": "application/json"})
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return r.status_code, error

    status, error = post(content=b'{"model": "x", "messages": [')
    assert status == 400 and error["code"] == "invalid_json"
    status, error = post({**ok, "model": "gpt-4"})
    assert status == 404 and error["code"] == "model_not_found" and error["param"] == "model"
    status, error = post({**ok, "max_tokens": -3})
    assert status == 400 and error["param"] == "max_tokens"
    status, error = post({**ok, "messages": [{"role": "user", "content": "word " * 600}]})
    assert status == 400 and error["code"] == "context_length_exceeded"
    status, error = post({**ok, "max_tokens": 100_000})
    assert status == 400 and error["code"] == "context_length_exceeded"
    for bad in ({"n": 2}, {"temperature": -1}, {"top_p": 0}, {"stop": [""]}, {"frobnicate": 1},
                {"messages": []}):
        status, error = post({**ok, **bad})
        assert status == 400, bad
    status, error = post({"model": NAME, "prompt": "Hi", "max_tokens": 0}, path=server.url + "/v1/completions")
    assert status == 400 and error["param"] == "max_tokens"
    r = httpx.get(server.url + "/v1/nothing-here", timeout=TIMEOUT)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(url, json=ok, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_a_client_that_disconnects_frees_its_row(server):
    cancelled = stats(server)["cancelled"]
    body = {"model": NAME, "messages": [{"role": "user", "content": "Count from 1 to 100."}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
        lines = response.iter_lines()
        read_until_content(lines, 3)
        assert stats(server)["running"] == 1
    assert wait_until(lambda: stats(server)["running"] == 0 and stats(server)["cancelled"] == cancelled + 1)
    # a non-streamed request whose client gives up long before its 400 tokens (which this CPU now decodes in ~3 s)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    assert wait_until(lambda: stats(server)["running"] == 0 and stats(server)["cancelled"] == cancelled + 2)
    assert chat(server, "Hi", 4, temperature=0).choices[0].message.content


def test_a_request_that_fails_mid_decode_fails_alone(smollm2, server, monkeypatch):
    model, tokenizer = smollm2

    choose = TokenChooser.__call__

    def faulty(self, logits, positions, tokens=None, tree_mask=None, start=0):
        """Raises in a decode step (the prefill passes no tokens) over rows that hold a request of seed 666."""
        rows = self.params[start:start + logits.shape[0]]
        if tokens is not None and any(p is not None and p.seed == 666 for p in rows):
            raise RuntimeError("injected fault")
        return choose(self, logits, positions, tokens, tree_mask, start=start)

    monkeypatch.setattr(TokenChooser, "__call__", faulty)
    failed = stats(server)["failed"]
    prompts = ["Name three colors.", "Name three animals.", "Name three cities."]
    body = {"model": NAME, "messages": [{"role": "user", "content": prompts[0]}], "max_tokens": 12,
            "temperature": 1.0, "seed": 666}
    with ThreadPoolExecutor(3) as pool:
        victim = pool.submit(httpx.post, server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
        others = [pool.submit(chat, server, p, 12, temperature=0) for p in prompts[1:]]
        r = victim.result()
        replies = [f.result() for f in others]
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "injected fault" in r.json()["error"]["message"]
    for prompt, reply in zip(prompts[1:], replies):
        assert reply.choices[0].message.content == solo(model, tokenizer, prompt, 12)[1]
    s = stats(server)
    assert s["failed"] == failed + 1 and s["running"] == 0


def test_a_full_queue_answers_503(smollm2):
    with serving(smollm2, max_batch=1, max_queue=1) as server:
        body = {"model": NAME, "messages": [{"role": "user", "content": "Count from 1 to 100."}], "max_tokens": 400,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as holder:
            lines = holder.iter_lines()  # kept referenced: a dropped line iterator closes the connection
            read_until_content(lines)  # the only row is taken
            waiting = threading.Thread(target=lambda: chat(server, "Hi", 4, temperature=0))
            waiting.start()
            assert wait_until(lambda: stats(server)["queued"] == 1)
            r = httpx.post(server.url + "/v1/chat/completions", timeout=TIMEOUT,
                           json={**body, "stream": False, "max_tokens": 4})
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        waiting.join(TIMEOUT)  # the holder's disconnect freed the row for the waiting request
        assert not waiting.is_alive() and stats(server)["finished"] == 1


def test_the_trie_persists_across_restarts(smollm2, tmp_path):
    path = tmp_path / "trie.json"
    prompt = "List the first ten prime numbers, separated by commas."

    def first_request(**engine_kwargs):
        with serving(smollm2, trie_path=path, **engine_kwargs) as server:
            r = chat(server, prompt, 24, temperature=0)
            saved_while_running = wait_until(path.exists, 10)
        return r.choices[0].message.content, r.usage.lookahead, saved_while_running

    # adaptive=False: whether drafts are verified must not depend on this machine's step timings
    fixed = LookaheadConfig(adaptive=False, decoding_length=12)
    text_cold, cold, saved = first_request(trie_save_minutes=0.002, lookahead=fixed)  # an empty trie: no file yet
    assert saved  # the periodic save wrote it before shutdown
    text_warm, warm, _ = first_request(lookahead=fixed)  # the restart loads the first run's outputs
    assert text_warm == text_cold
    assert warm["accepted_tokens_per_step"] > cold["accepted_tokens_per_step"]
    assert warm["steps"] < cold["steps"]
