"""Drafting pools (lookahead/pools.py, docs/tenants.md): what one pool's requests generate is drafted for that pool
only, the shared trie is read by every pool and written by none, recycled tokens stay in their pool, and the
pools are bounded one by one and together, least recently used dropped first."""

import pytest
import torch

from lookahead import Drafter, LookaheadConfig, TokenTrie
from lookahead.drafting.pools import DraftPools

CFG = LookaheadConfig(branch_length=8, max_query_length=4, decoding_length=16)
SECRET = list(range(100, 140))  # what one pool's request generated
PROMPT = [1, 2, 3]


def drafter(trie: TokenTrie | None = None, pools: DraftPools | None = None) -> Drafter:
    return Drafter(CFG, trie=trie if trie is not None else TokenTrie(8, 10_000), pools=pools)


def learn(d: Drafter, rid: int, tokens: list[int], pool, predictions=None) -> None:
    """A finished request of `pool` that generated `tokens`."""
    d.begin_request(rid, PROMPT, pool=pool)
    d.update(rid, tokens, predictions)
    d.end_request(rid)


def drafted_after(d: Drafter, rid: int, pool, generated: list[int]) -> list[int]:
    """The draft of a new request of `pool` that has generated `generated` so far (its context: prompt + that)."""
    d.begin_request(rid, PROMPT, pool=pool)
    d.update(rid, generated)
    tokens, _ = d.draft(rid, PROMPT + generated)
    d.end_request(rid)
    return tokens


def test_a_pools_history_is_drafted_for_its_own_requests_only():
    d = drafter()
    learn(d, 1, SECRET, pool=("victim", None))
    assert drafted_after(d, 2, ("victim", None), SECRET[:6])[:4] == SECRET[6:10]  # same pool: drafted from history
    assert len(d.trie) == 0  # a pooled request never writes the shared trie
    for other in (("attacker", None), ("victim", "salt"), None):  # another key, another salt, the shared trie
        assert not set(drafted_after(d, 3, other, SECRET[:6])) & set(SECRET[6:]), other


def test_the_shared_trie_is_read_by_every_pool_and_written_only_by_unpooled_requests():
    base = TokenTrie(8, 10_000)
    base.insert(SECRET)  # the operator's base (`--trie PATH`)
    d = drafter(base)
    before = len(base)
    for pool in (("a", None), ("b", "s")):
        assert drafted_after(d, 1, pool, SECRET[:6])[:4] == SECRET[6:10], pool
        learn(d, 2, list(range(300, 340)), pool)
    assert len(base) == before and not base.candidates([300, 301, 302], 4, max_query_length=3)[2]
    learn(d, 3, list(range(500, 540)), pool=None)  # no pool: today's behaviour, the shared trie learns
    assert base.candidates([500, 501, 502], 4, max_query_length=3)[2]


def test_recycled_tokens_stay_in_their_pool():
    d = drafter()
    # the model's top-k after token 7 as one pool's request saw it: 7 -> 42 43
    learn(d, 1, [5, 6, 7], pool="a", predictions={7: [42, 43]})
    assert d.successors == {} and d.pools._pools["a"].successors == {7: [42, 43]}
    assert drafted_after(d, 2, "a", [9, 7])[:1] == [42]
    assert 42 not in drafted_after(d, 3, "b", [9, 7])
    assert 42 not in drafted_after(d, 4, None, [9, 7])


def test_a_pool_is_bounded_by_max_pool_nodes():
    d = drafter(pools=DraftPools(max_pool_nodes=200))
    d.begin_request(1, PROMPT, pool="a")
    for start in range(0, 4000, 40):
        d.update(1, list(range(1000 + start, 1040 + start)))
    pool = d.pools._pools["a"]
    assert pool.trie.max_trie_nodes == 200 and len(pool.trie) <= 1.1 * 200
    d.end_request(1)
    assert pool.running == 0


def test_pools_over_the_total_bound_drop_the_least_recently_used_first():
    base = TokenTrie(8, 10_000)
    base.insert(list(range(2000, 2010)))  # the base's nodes count in the total
    base_nodes = len(base)
    pools = DraftPools(max_pool_nodes=1000)
    d = drafter(base, pools)
    learn(d, 0, list(range(100, 140)), pool="a")
    one = pools.nodes()  # one pool's history of 40 new tokens
    pools.configure(max_pool_nodes=1000, max_total_nodes=len(base) + int(2.5 * one))  # room for two such pools
    for i, key in enumerate("bc", start=1):
        learn(d, i, list(range(100 * (i + 1), 100 * (i + 1) + 40)), pool=key)
        assert len(base) + pools.nodes() <= pools.max_total_nodes
    assert list(pools._pools) == ["b", "c"] and pools.dropped == 1  # c's arrival dropped a, the least recent
    d.begin_request(10, PROMPT, pool="b")  # b is used again: c is now the least recently used
    learn(d, 11, list(range(900, 940)), pool="d")
    assert list(pools._pools) == ["b", "d"]
    # over the bound with every pool busy: the least recently used is emptied, never dropped, and drafts on
    d.begin_request(12, PROMPT, pool="d")
    d.update(10, list(range(700, 760)))
    d.update(12, list(range(3000, 3060)))
    pools.bound(base)
    assert list(pools._pools) == ["b", "d"] and len(base) + pools.nodes() <= pools.max_total_nodes
    assert len(pools._pools["b"].trie) == 0 and len(pools._pools["d"].trie) > 0
    d.update(10, [5, 6])
    d.draft(10, PROMPT + list(range(700, 760)) + [5, 6])
    for rid in (10, 12):
        d.end_request(rid)
    assert all(p.running == 0 for p in pools._pools.values())
    assert len(base) + pools.nodes() <= pools.max_total_nodes and len(base) == base_nodes  # the base: never touched


def test_bad_bounds_and_keys_raise():
    with pytest.raises(ValueError, match="max_pool_nodes"):
        DraftPools(max_pool_nodes=3)
    with pytest.raises(ValueError, match="max_total_nodes"):
        DraftPools(max_total_nodes="many")
    with pytest.raises(ValueError, match="None is the shared base"):
        DraftPools().acquire(None, TokenTrie())


def test_generate_with_a_pool_is_exact_and_keeps_its_history_apart(tiny_llama):
    model = tiny_llama(seed=3)
    ids = torch.tensor([[5, 9, 11, 5, 9]])
    plain = model.generate(ids, max_new_tokens=24, lookahead=False)
    cfg = LookaheadConfig(adaptive=False, decoding_length=8, branch_length=8)
    model.trie = TokenTrie(8, 10_000)
    first = model.generate(ids, max_new_tokens=24, lookahead=cfg, pool="alice", return_dict_in_generate=True)
    assert torch.equal(first.sequences, plain)
    assert len(model.trie) == 0 and len(model.state.pools) == 1  # the pool learned, the model's trie did not
    again = model.generate(ids, max_new_tokens=24, lookahead=cfg, pool="alice", return_dict_in_generate=True)
    other = model.generate(ids, max_new_tokens=24, lookahead=cfg, pool="bob", return_dict_in_generate=True)
    assert torch.equal(again.sequences, plain) and torch.equal(other.sequences, plain)
    assert again.stats.accepted_per_step > other.stats.accepted_per_step  # alice drafts from her first call
    with pytest.raises(ValueError, match="pool must be a non-empty string"):
        model.generate(ids, max_new_tokens=4, pool=3)


def second_vllm_request_draft(monkeypatch, mode: str, salts=(None, None)) -> list[int]:
    """vLLM's proposer: a request generates SECRET and ends, then another asks about SECRET's start in the same
    row -> the chain drafted for the second (salts: each request's pool as its caller passes it)."""
    from lookahead.integrations.vllm import LookaheadProposer
    from tests.helpers import VllmBatch, vllm_config

    monkeypatch.setenv("LOOKAHEAD_VLLM_STEP_TOKENS", "inf")  # no cost cut: whole chains
    monkeypatch.setenv("LOOKAHEAD_VLLM_POOLS", mode)
    proposer = LookaheadProposer(vllm_config(k=4), gate=False)
    batch = VllmBatch(rows=1, max_model_len=128)
    batch.put(0, PROMPT + SECRET[:1])
    proposer.propose([SECRET[:1]], batch.lengths, batch.tokens, pools=[salts[0]])
    for token in SECRET[1:30]:
        batch.commit(0, [token])
        proposer.propose([[token]], batch.lengths, batch.tokens, pools=[salts[0]])
    batch.put(0, [7, 8] + SECRET[:6])  # the first request left the row; the next sampled SECRET[5] after its prompt
    draft = proposer.propose([[SECRET[5]]], batch.lengths, batch.tokens, pools=[salts[1]])[0]
    assert proposer.drafter.running_requests() == [1]
    assert len(proposer.drafter.pools) == (mode == "request") + len({s for s in salts if s is not None})
    return draft


def test_the_vllm_proposer_isolates_by_request_or_by_the_salt_its_caller_passes(monkeypatch):
    assert second_vllm_request_draft(monkeypatch, "shared") == SECRET[6:10]  # today: one trie for every request
    assert second_vllm_request_draft(monkeypatch, "shared", ("s", "s")) == SECRET[6:10]
    assert SECRET[6] not in second_vllm_request_draft(monkeypatch, "shared", ("s", "t"))
    assert SECRET[6] not in second_vllm_request_draft(monkeypatch, "request")
    monkeypatch.setenv("LOOKAHEAD_VLLM_POOLS", "tenant")
    with pytest.raises(ValueError, match="LOOKAHEAD_VLLM_POOLS"):
        from lookahead.integrations.vllm import LookaheadProposer
        from tests.helpers import vllm_config

        LookaheadProposer(vllm_config(k=4))


def test_a_pool_over_an_empty_shared_trie_drafts_exactly_as_the_shared_trie_did():
    """One tenant's requests in their own pool see what they would have seen in the shared trie: same drafts."""
    import random

    rng = random.Random(0)
    texts = [[rng.randrange(30) for _ in range(60)] for _ in range(6)]  # a small vocabulary: many repeats
    drafts = {}
    for pool in (None, "tenant"):
        d = Drafter(LookaheadConfig(branch_length=8, max_query_length=4, decoding_length=16),
                    cost_curve={1: 1.0, 16: 1.3, 32: 1.9}, trie=TokenTrie(8, 10_000))
        out = drafts[pool] = []
        for rid, text in enumerate(texts):
            d.begin_request(rid, text[:5], pool=pool)
            for i in range(5, len(text), 3):
                out.append(d.draft(rid, text[:i]))
                d.update(rid, text[i:i + 3], predictions={text[i]: [text[(i + 7) % len(text)]]})
            d.end_request(rid)
    assert drafts["tenant"] == drafts[None] and any(tokens for tokens, _ in drafts[None])


def test_replay_deals_requests_to_tenants_and_each_tenant_drafts_from_its_own_history_only():
    from lookahead.replay import CURVES, SHIPPED, load_recording, replay

    _, records = load_recording(SHIPPED)
    twice = records[:3] * 2  # every request asked again: in one pool its repeat drafts from its first answer
    shared = replay(twice, LookaheadConfig(), CURVES["h100-7b"])["ALL"]
    apart = replay(twice, LookaheadConfig(), CURVES["h100-7b"], tenants=2)["ALL"]  # (tenant of i: i % 2)
    split = replay(twice, LookaheadConfig(), CURVES["h100-7b"], tenants=6)["ALL"]  # every request alone
    assert shared.tokens == apart.tokens == split.tokens
    # with 2 tenants (i % 2) every repeat i + 3 lands in the other pool, beside other requests' history; with 6 alone
    assert shared.tokens_per_step > apart.tokens_per_step > split.tokens_per_step
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="tenants must be an int >= 1"):
            replay(twice, LookaheadConfig(), CURVES["h100-7b"], tenants=bad)
