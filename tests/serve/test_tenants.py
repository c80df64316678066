"""Tenants (docs/tenants.md) on the embedded SmolLM2 (bf16 on CPU: exact with the C++ ops, and faster than fp32):
issue 37's experiment with two API keys, where what one key asked must not show in the other's drafting, while a
key's own history still drafts; the same for two cache_salts under one key; bad keys and salts get OpenAI errors;
/v1/stats and /metrics count pools, never name them."""

import contextlib

import httpx
import pytest
import torch

from lookahead import LookaheadConfig
from lookahead.serve.app import BackgroundServer, read_api_keys, tenant_keys
from lookahead.serve.scheduler import Scheduler
from lookahead.benchmarks.tenants_bench import compare, experiment, merge
from lookahead.engine.state import GenerationState

slow = pytest.mark.slow
NAME = "smollm2-135m-instruct"
KEYS = {"victim": "victim-secret", "attacker": "attacker-secret"}
TIMEOUT = 120
QUESTIONS = 10  # a side: the "10+"
# adaptive=False: what is drafted must not depend on this machine's step timings (the drafting gate, the learned
# step price), so accepted tokens/step are the drafter's alone
FIXED = LookaheadConfig(adaptive=False, decoding_length=12)


@contextlib.contextmanager
def serving(smollm2, **scheduler_kwargs):
    """A fresh server (empty trie, no pools) with the two keys."""
    model, tokenizer = smollm2
    saved = model.state
    model.state = GenerationState(cost_curves=dict(saved.cost_curves), step_costs=saved.step_costs)
    try:
        scheduler = Scheduler(model, metrics=True, **{"max_batch": 4, "max_context": 768, "lookahead": FIXED,
                                                      **scheduler_kwargs})
        with BackgroundServer(scheduler, tokenizer, NAME, api_keys=KEYS) as server:
            yield server
    finally:
        model.state = saved


@pytest.fixture(scope="module")
def smollm2_bf16(smollm2_half):
    models, tokenizer = smollm2_half
    return models[torch.bfloat16], tokenizer


@pytest.fixture(scope="module")
def phases(smollm2_bf16):
    """The experiment, counterbalanced: on a fresh server, then on another with the question sets' roles swapped,
    so each question is once asked by another and once never asked (the sets' own acceptance differs by ~30%)."""
    halves = []
    for swap in (False, True):
        with serving(smollm2_bf16) as server:
            halves.append(experiment(server.url, KEYS["victim"], KEYS["attacker"], QUESTIONS, max_tokens=48,
                                     log=lambda _: None, swap=swap))
            stats = httpx.get(server.url + "/v1/stats", headers={"Authorization": "Bearer victim-secret"},
                              timeout=TIMEOUT).json()
            metrics = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    return merge(*halves), stats, metrics


def accepted(answers) -> list[float]:
    return [a.accepted_per_step for a in answers]


@slow
@pytest.mark.parametrize("who, baseline", [("attacker", "attacker: never asked"), ("attacker", "victim: first ask"),
                                           ("salt y", "salt y: never asked"), ("salt y", "salt x: first ask")])
def test_what_another_tenant_or_salt_asked_does_not_show_in_drafting(phases, who, baseline):
    """Another key (or another salt under the victim's key) gets no more accepted tokens/step on the questions the
    victim asked than on questions nobody asked, or than the victim got on them when nobody had asked them: no
    difference a permutation test finds, and means within 10%."""
    out, _, _ = phases
    result = compare(accepted(out[f"{who}: asked by another"]), accepted(out[baseline]))
    print(f"{who}: asked by another vs {baseline}: {result}")
    assert result["p"] > 0.05 and abs(result["relative_difference"]) <= 0.10, result


@slow
@pytest.mark.parametrize("who", ["victim", "salt x"])
def test_within_one_tenant_and_salt_repeats_still_draft_from_history(phases, who):
    """The pool's own history drafts as the shared trie did: every repeat of a question beats its first ask."""
    out, _, _ = phases
    first, repeats = accepted(out[f"{who}: first ask"]), accepted(out[f"{who}: repeats"])
    print(f"{who}: first ask {sum(first) / len(first):.3f}, repeats {sum(repeats) / len(repeats):.3f}")
    assert all(r > f for r, f in zip(repeats, first)), (first, repeats)
    assert sum(repeats) / len(repeats) > 1.5 * sum(first) / len(first)
    # what the other tenant / salt got on the very same questions is what nobody's history gives
    other = accepted(out[f"{'attacker' if who == 'victim' else 'salt y'}: asked by another"])
    assert sum(repeats) / len(repeats) > 1.5 * sum(other) / len(other)


@slow
def test_stats_and_metrics_count_pools_without_naming_keys(phases):
    _, stats, metrics = phases
    # pools: (victim, None), (attacker, None), (victim, "x"), (victim, "y"); the shared trie learned nothing
    assert stats["drafting_pools"] == 4 and stats["pool_trie_nodes"] > 0 and stats["trie_nodes"] == 0
    assert "lookahead:drafting_pools 4.0" in metrics and "lookahead:pool_trie_nodes" in metrics
    for text in (str(stats), metrics):
        assert not any(word in text for word in ("victim", "attacker", "secret"))


@slow
def test_unknown_keys_and_bad_cache_salts_get_openai_errors(smollm2_bf16):
    ok = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    with serving(smollm2_bf16) as server:
        url = server.url + "/v1/chat/completions"

        def post(body, key="victim-secret"):
            r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"} if key else {},
                           timeout=TIMEOUT)
            return r.status_code, r.json()

        for key in ("intruder", None, "victim-secretx", "attacker"):
            status, body = post(ok, key)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", key
        for salt in (7, ["x"], {"a": 1}, "", "s" * 257, "é" * 129):  # é is 2 bytes: 258
            status, body = post({**ok, "cache_salt": salt})
            assert status == 400 and body["error"]["param"] == "cache_salt" and body["error"]["message"], salt
        for salt in (None, "s" * 256, "é" * 128):
            status, body = post({**ok, "cache_salt": salt})
            assert status == 200, (salt, body)
        status, _ = post({**ok, "user": "someone"}, key="attacker-secret")
        assert status == 200
        stats = httpx.get(server.url + "/v1/stats", headers={"Authorization": "Bearer attacker-secret"},
                          timeout=TIMEOUT).json()
        # (victim, None), (victim, 256 s), (victim, 128 é), (attacker, None): `user` selected no pool
        assert stats["drafting_pools"] == 4


def test_api_keys_from_flags_and_a_file_name_the_tenants(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# tenants\nalice: a-key\n\nbob:b-key\n")
    assert read_api_keys(str(path)) == {"alice": "a-key", "bob": "b-key"}
    assert tenant_keys(["k1", "k2"], read_api_keys(str(path))) == {"key1": "k1", "key2": "k2", "alice": "a-key",
                                                                     "bob": "b-key"}
    assert tenant_keys("only") == {"key1": "only"} and tenant_keys(None) == {} and tenant_keys("") == {}
    for bad, match in (("alice a-key\n", "expected 'name:key'"), ("a:1\na:2\n", "used twice"), ("# none\n", "no")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=match):
            read_api_keys(str(path))
    with pytest.raises(ValueError, match="also another tenant's key"):
        tenant_keys(["same"], {"bob": "same"})
    with pytest.raises(ValueError, match="surrounding whitespace"):
        tenant_keys([" padded"])
