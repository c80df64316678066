"""What an operator relies on: API keys, Prometheus metrics, request timeouts, incremental streaming, a bounded
soak under mixed traffic, a server killed with SIGKILL and restarted, and a graceful SIGTERM.

The server runs a tiny random-weight Llama with SmolLM2's vocabulary and tokenizer (fast on 2 cores), in a thread
of this process or as a `lookahead serve` subprocess on a free port of 127.0.0.1."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import transformers

from lookahead import TokenTrie
from lookahead.models import LlamaForLookahead, resolve_checkpoint
from lookahead.serve.app import BackgroundServer, TextStream, decode
from lookahead.serve.scheduler import Scheduler

pytestmark = pytest.mark.slow
NAME = "tiny"
KEY = "sk-test-key"
TIMEOUT = 60


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An HF checkpoint dir: a random 2-layer Llama with SmolLM2's vocabulary, and SmolLM2's tokenizer files."""
    smol = resolve_checkpoint("smollm2-135m-instruct")
    vocab = json.loads((smol / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=2, tie_word_embeddings=False))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5 if p.dim() > 1 else 0.1)
    path = tmp_path_factory.mktemp("tiny_smol_vocab")
    hf.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smol / name).exists():
            shutil.copy(smol / name, path / name)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model = LlamaForLookahead.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    return model, tokenizer


def body(content: str, max_tokens: int, **kw) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **kw}


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def solo(model, tokenizer, content: str, max_tokens: int) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    return model.generate(ids, max_new_tokens=max_tokens, lookahead=False)[0, ids.shape[1]:].tolist()


def test_text_stream_is_incremental_and_equals_the_whole_decode(tiny):
    _, tokenizer = tiny
    rng = random.Random(0)
    text = "Hello wörld — naïve café 東京 🙂 the end.\nSecond line: x = y + 1; done"
    ids = tokenizer(text).input_ids
    for stops in ((), ("line:",), ("🙂",)):
        stream, pieces, i = TextStream(tokenizer, stops), [], 0
        while i < len(ids):
            n = rng.randint(1, 3)
            pieces.append(stream.push(ids[i:i + n]))
            i += n
        pieces.append(stream.finish())
        whole = decode(tokenizer, ids)
        expected = whole[:whole.index(stops[0])] if stops else whole
        assert "".join(pieces) == expected
        # the request ends with the token that completes the stop string (generate's cut), later tokens ignored
        completing = next((n for n in range(1, len(ids) + 1) if stops and stops[0] in decode(tokenizer, ids[:n])),
                          None)
        assert stream.kept == completing and (not stops or len(stream.ids) < len(ids))
        assert stream.push(ids[:3]) == "" if stops else True
    calls = []
    counting = TextStream(tokenizer, ())
    original = tokenizer.decode

    def decode_spy(tokens, **kw):
        calls.append(len(tokens))
        return original(tokens, **kw)

    tokenizer.decode = decode_spy
    try:
        for t in ids * 4:
            counting.push([t])
    finally:
        del tokenizer.decode
    assert max(calls) <= 8  # each push decodes a window of the latest tokens, never the whole output


@pytest.fixture(scope="module")
def server(tiny):
    model, tokenizer = tiny
    scheduler = Scheduler(model, max_batch=8, max_context=256, metrics=True,
                          request_timeout=20.0)
    with BackgroundServer(scheduler, tokenizer, NAME, api_key=KEY) as server:
        yield server


def test_api_key_guards_every_v1_route_but_not_health_and_metrics(server):
    url = server.url
    for path, method in (("/v1/models", "GET"), ("/v1/stats", "GET"), ("/v1/chat/completions", "POST")):
        for headers in ({}, auth("wrong"), {"Authorization": KEY}):
            r = httpx.request(method, url + path, headers=headers, json=body("Hi", 2), timeout=TIMEOUT)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    assert httpx.get(url + "/v1/models", headers=auth(), timeout=TIMEOUT).json()["data"][0]["id"] == NAME
    assert httpx.get(url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
    assert httpx.get(url + "/metrics", timeout=TIMEOUT).status_code == 200


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value in Prometheus text, 0 when the series has no sample yet."""
    for line in text.splitlines():
        if line.startswith(name + (labels and "{" + labels + "}") + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_tokens_steps_and_first_tokens(server):
    before = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    r = httpx.post(server.url + "/v1/chat/completions", json=body("Count to ten.", 12), headers=auth(),
                   timeout=TIMEOUT).json()
    after = httpx.get(server.url + "/metrics", timeout=TIMEOUT)
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    done = 'finished_reason="' + r["choices"][0]["finish_reason"] + '"'
    assert metric(text, "lookahead:request_success_total", done) == metric(
        before, "lookahead:request_success_total", done) + 1
    assert metric(text, "lookahead:generation_tokens_total") - metric(before, "lookahead:generation_tokens_total") \
        == r["usage"]["completion_tokens"]
    assert metric(text, "lookahead:prompt_tokens_total") - metric(before, "lookahead:prompt_tokens_total") \
        == r["usage"]["prompt_tokens"]
    assert metric(text, "lookahead:time_to_first_token_seconds_count") >= 1
    assert metric(text, "lookahead:step_latency_seconds_count") > metric(before, "lookahead:step_latency_seconds_count")
    assert metric(text, "lookahead:num_requests_running") == 0 and metric(text, "lookahead:num_requests_waiting") == 0


def test_a_stop_found_in_the_text_ends_the_request_with_its_tokens_up_to_the_stop(tiny):
    """The scheduler never reads text: `stop(req, keep)` (the text stream found a stop string) ends the request at
    the next step boundary, its output cut to `keep` tokens, its row and drafter state freed."""
    from lookahead.serve.scheduler import Finished, Tokens

    model, _ = tiny
    scheduler = Scheduler(model, max_batch=2, max_context=200).start()
    try:
        events, done = [], threading.Event()

        def sink(event):
            events.append(event)
            if isinstance(event, Tokens) and sum(len(e.tokens) for e in events if isinstance(e, Tokens)) >= 5:
                scheduler.stop(req, 3)
            if isinstance(event, Finished):
                done.set()

        req = scheduler.submit([1, 2, 3, 4], 150, sink=sink)
        assert done.wait(60)
        fin = events[-1]
        assert fin.reason == "stop" and fin.completion_tokens == 3 and len(req.output) == 3
        assert sum(len(e.tokens) for e in events[:-1]) < 150  # it did not run to max_tokens
        assert scheduler.engine.free_rows() == 2 and scheduler.engine.drafting_requests() == 0
        assert scheduler.stats.finished == 1 and scheduler.stats.completion_tokens == 3
    finally:
        scheduler.close()


def test_a_saved_trie_of_other_settings_is_served_with_the_defaults_for_it(tiny, tmp_path):
    """lookahead=True (what `lookahead serve` passes) is `LookaheadConfig.for_trie` of the trie it loads."""
    model, _ = tiny
    path, trie = tmp_path / "trie.json", model.trie
    TokenTrie(branch_length=6, max_trie_nodes=5000).save(path)
    scheduler = Scheduler(model, max_batch=1, max_context=64, trie_path=path, trie_save_minutes=0).start()
    try:
        assert (scheduler.config.branch_length, scheduler.config.max_trie_nodes) == (6, 5000)
        assert scheduler.engine.drafter.trie is scheduler.trie is model.trie
    finally:
        scheduler.close()
        model.trie = trie


def test_stats_and_metrics_account_memory_by_part(tiny, server):
    from lookahead.serve.memory import TRIE_NODE_BYTES, model_memory_bytes

    model, _ = tiny
    httpx.post(server.url + "/v1/chat/completions", json=body("Count to ten.", 8), headers=auth(), timeout=TIMEOUT)
    stats = httpx.get(server.url + "/v1/stats", headers=auth(), timeout=TIMEOUT).json()
    memory = stats["memory_bytes"]
    assert set(memory) == {"weights", "kv_cache", "trie", "suffix_automata", "workspace", "rss", "rss_peak"}
    assert memory["weights"] == model_memory_bytes(model) > 0
    cache = server.scheduler.engine.cache
    assert memory["kv_cache"] == cache.buffer.nbytes + cache.lens.nbytes
    assert memory["trie"] == stats["trie_nodes"] * TRIE_NODE_BYTES > 0  # the finished request's output stays
    assert memory["suffix_automata"] == 0  # no request is running
    assert 0 < memory["rss"] <= memory["rss_peak"] and memory["workspace"] > 0
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    assert metric(text, "lookahead:memory_bytes", 'part="weights"') == memory["weights"]
    assert metric(text, "lookahead:memory_bytes", 'part="rss"') > 0


def test_an_unknown_message_role_is_a_400_naming_the_allowed_roles(server):
    bad = {**body("Hi", 2), "messages": [{"role": "wizard", "content": "Hi"}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=bad, headers=auth(), timeout=TIMEOUT)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages.0.role"
    assert all(role in error["message"] for role in ("system", "developer", "user", "assistant", "tool"))
    ok = {**body("Hi", 2), "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    assert httpx.post(server.url + "/v1/chat/completions", json=ok, headers=auth(), timeout=TIMEOUT).status_code == 200


def test_a_request_past_its_timeout_ends_with_504_and_frees_its_row(tiny):
    model, tokenizer = tiny
    scheduler = Scheduler(model, max_batch=2, max_context=1000, request_timeout=0.3,
                          lookahead=None)
    with BackgroundServer(scheduler, tokenizer, NAME) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=body("Go on forever.", 900), timeout=TIMEOUT)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=TIMEOUT,
                          json=body("Go on forever.", 900, stream=True)) as response:
            lines = [line for line in response.iter_lines() if line]
        assert "timeout" in lines[-2] and lines[-1] == "data: [DONE]"
        health = httpx.get(srv.url + "/health", timeout=TIMEOUT).json()
        assert health["running"] == 0 and scheduler.stats.timed_out == 2
        assert scheduler.engine.free_rows() == 2


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_soak_mixed_traffic_leaves_nothing_behind(tiny, tiny_dir, tmp_path):
    """A `lookahead serve` process takes 200 requests from 16 concurrent clients: random max_tokens, stop strings and
    seeds; 10% disconnect mid-stream; 10% malformed or unauthorised. Afterwards every row is free, nothing is
    queued, /health is ok, every completed greedy output equals its solo output, and the server's resident memory
    grew by less than 10% over the second half."""
    model, tokenizer = tiny
    rng = random.Random(1)
    prompts = ["Tell me about the sea.", "Count to five.", "What is a trie?", "Write a poem.", "Hi!"]
    plans = []
    for i in range(200):
        kind = rng.choices(["greedy", "sampled", "disconnect", "bad"], [0.55, 0.25, 0.1, 0.1])[0]
        plans.append((i, kind, rng.choice(prompts), rng.randint(1, 24), rng.random() < 0.3, rng.randint(0, 99)))
    completed: dict[int, tuple[str, str, int]] = {}

    def run(plan):
        i, kind, prompt, max_tokens, with_stop, seed = plan
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            if kind == "bad":
                if i % 2:
                    r = c.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                               headers={**auth(), "content-type": "application/json"})
                    assert r.status_code == 400
                else:
                    assert c.post("/v1/chat/completions", json=body(prompt, max_tokens)).status_code == 401
                return
            extra = {"stop": [" the"]} if with_stop else {}
            if kind == "sampled":
                extra.update(temperature=0.8, seed=seed)
            if kind == "disconnect":
                with c.stream("POST", "/v1/chat/completions", headers=auth(),
                              json=body(prompt, 200, stream=True, **extra)) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: ") and '"content":"' in line:
                            break  # leave mid-stream
                return
            r = c.post("/v1/chat/completions", headers=auth(), json=body(prompt, max_tokens, **extra))
            assert r.status_code == 200, r.text
            completed[i] = (kind, r.json()["choices"][0]["message"]["content"], r.json()["usage"]["completion_tokens"])

    proc, url = _serve(tiny_dir, tmp_path / "trie.json", "--api-key", KEY, "--max-queue", "512")
    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(run, plans[:100]))
            half = _rss_kb(proc.pid)
            list(pool.map(run, plans[100:]))
        end = _rss_kb(proc.pid)
        deadline = time.monotonic() + TIMEOUT
        while httpx.get(url + "/health", timeout=TIMEOUT).json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)  # a disconnected stream's row frees at the next step boundary
        health = httpx.get(url + "/health", timeout=TIMEOUT).json()
        assert health == {"status": "ok", "model": NAME, "running": 0, "queued": 0}
        stats = httpx.get(url + "/v1/stats", headers=auth(), timeout=TIMEOUT).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert stats["free_rows"] == stats["max_batch"] and stats["drafting_requests"] == 0
    assert stats["cancelled"] >= 1 and stats["failed"] == 0 and stats["finished"] == len(completed)
    for i, (kind, text, n) in completed.items():
        if kind == "greedy" and not plans[i][4]:
            expected = solo(model, tokenizer, plans[i][2], plans[i][3])
            assert text == decode(tokenizer, expected) and n == len(expected), i
    assert end < 1.10 * half, (half, end)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tiny_dir, trie, *extra) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lookahead.serve", "--model", str(tiny_dir), "--port", str(port),
                             "--max-batch", "4", "--max-context", "256", "--trie", str(trie), "--threads", "1",
                             "--dtype", "fp32",  # the solo references are fp32 (auto would be bf16 on a bf16 CPU)
                             "--served-model-name", NAME, "--log-level", "warning", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start")


def test_a_killed_server_restarts_from_its_last_saved_trie(tiny_dir, tmp_path):
    trie = tmp_path / "trie.json"
    proc, url = _serve(tiny_dir, trie, "--trie-save-minutes", "0.002")  # saves every 0.12 s
    try:
        stop = threading.Event()

        def traffic():  # requests keep running while the server is killed
            with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
                while not stop.is_set():
                    try:
                        c.post("/v1/chat/completions", json=body("Tell me a long story.", 64))
                    except httpx.TransportError:
                        return

        threads = [threading.Thread(target=traffic) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + TIMEOUT
        while not (trie.exists() and len(TokenTrie.load(trie)) > 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = TokenTrie.load(trie)  # whole: the saves replace the file atomically, never tear it
    assert len(saved) > 0
    proc, url = _serve(tiny_dir, trie)
    try:
        stats = httpx.get(url + "/v1/stats", timeout=TIMEOUT).json()
        assert stats["trie_nodes"] == len(saved)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_sigterm_lets_a_running_request_finish_then_saves_the_trie(tiny_dir, tmp_path):
    trie = tmp_path / "trie.json"
    proc, url = _serve(tiny_dir, trie, "--trie-save-minutes", "0")
    lines = []
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=TIMEOUT,
                          json=body("Tell me a long story.", 200, stream=True)) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert lines[-1] == "data: [DONE]"
    finish = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines[:-1]]
    assert finish[-1] in ("stop", "length")  # finished normally, not cancelled
    assert len(TokenTrie.load(trie)) > 0  # the shutdown saved what the request wrote
