"""The chain mode of the Drafter and the vLLM proposer driven with vLLM-shaped numpy inputs, without vLLM: rows
changing requests, requests moving rows, empty rows, the K and model-length caps, the cost policy."""


import numpy as np
import pytest

from lookahead import Drafter, LookaheadConfig, TokenTrie
from lookahead.integrations.vllm import LookaheadProposer
from tests.helpers import VllmBatch, vllm_config

PATTERN = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]


@pytest.fixture(autouse=True)
def _no_timing_gate(monkeypatch):
    """These tests pin what the proposer drafts; its timing gate (test_vllm_replay) would follow the wall clock."""
    monkeypatch.setenv("LOOKAHEAD_VLLM_GATE", "0")


class _Linear:
    """A step price under which one more verified token costs c of a one-token step."""

    def __init__(self, c):
        self.c = c

    def cost(self, rows, tokens):
        return rows * (1 + self.c * (tokens - 1))


def _drafter_with(prompt, *others, step_cost=None):
    drafter = Drafter(LookaheadConfig(branch_length=8), step_cost=step_cost)
    for seq in others:
        drafter.trie.insert(seq)
    drafter.begin_request(0, prompt)
    return drafter


def test_chain_is_the_proposal_path_of_highest_expected_accepted_length():
    # after 3: the prompt says 4 then 20 once and 4 then 30 twice elsewhere; other sequences say 3 -> 9 ...
    drafter = _drafter_with([1, 3, 4, 20, 2, 3, 4, 30, 2, 3, 4, 30, 2, 3], [3, 9, 9, 9], [3, 9, 9, 9])
    nodes = drafter._proposal(0, [2, 3], drafter.config.decoding_length)
    gains = []
    for n in nodes:
        gains.append(n.p + (gains[n.parent] if n.parent >= 0 else 0.0))
    best = max((i for i in range(len(nodes)) if nodes[i].depth <= 16), key=lambda i: (gains[i], -i))
    path = []
    while best >= 0:
        path.insert(0, nodes[best])
        best = nodes[best].parent
    tokens, probs = drafter.draft_chain(0, [2, 3], 16)
    assert tokens == [n.token for n in path] and tokens[:3] == [4, 30, 2] and len(tokens) <= 16
    assert nodes[0].token == 9  # the likeliest single node starts a shorter-lived path (9 9 9): not the chain
    assert probs == pytest.approx([n.p for n in path])
    assert all(a >= b for a, b in zip(probs, probs[1:]))  # a chain's probabilities never rise
    assert sum(probs) == pytest.approx(max(g for g, n in zip(gains, nodes) if n.depth <= 16))


def test_chain_respects_the_cap_and_the_token_cost():
    drafter = _drafter_with(PATTERN + PATTERN[:3])
    full, probs = drafter.draft_chain(0, PATTERN[:3], 16)
    assert full == (PATTERN[3:] + PATTERN)[:16]  # the prompt's pattern, around again, up to the cap
    assert drafter.draft_chain(0, PATTERN[:3], 3)[0] == full[:3]
    assert drafter.draft_chain(0, PATTERN[:3], 0) == ([], [])
    # the cut maximises (1 + sum p) / (1 + c k): recompute it from the full chain's probabilities
    c = 0.3
    scores = [(1 + sum(probs[:k])) / (1 + c * k) for k in range(len(probs) + 1)]
    priced = _drafter_with(PATTERN + PATTERN[:3], step_cost=_Linear(c))
    assert priced.token_cost(1) == pytest.approx(c) and priced.token_cost(5) == pytest.approx(c)
    cut, _ = priced.draft_chain(0, PATTERN[:3], 16, rows=5)
    assert len(cut) == max(range(len(scores)), key=lambda k: (scores[k], -k)) and cut == full[:len(cut)]
    assert 0 < len(cut) < len(full)
    dear = _drafter_with(PATTERN + PATTERN[:3], step_cost=_Linear(1.0))
    assert dear.draft_chain(0, PATTERN[:3], 16) == ([], [])  # no p > 1: nothing pays
    with pytest.raises(ValueError, match="max_tokens"):
        drafter.draft_chain(0, PATTERN[:3], -1)
    with pytest.raises(ValueError, match="rows"):
        drafter.draft_chain(0, PATTERN[:3], 4, rows=0)
    with pytest.raises(ValueError, match="context_ids is empty"):
        drafter.draft_chain(0, [], 4)


def test_chain_is_calibrated_against_what_the_step_commits():
    drafter = _drafter_with(PATTERN + PATTERN[:3])
    tokens, _ = drafter.draft_chain(0, PATTERN[:3], 4)
    sent = drafter._requests[0].sent
    assert len(tokens) == 4 and [n.token for n in sent] == tokens  # the chain, re-indexed as a chain
    assert [n.parent for n in sent] == [-1, 0, 1, 2] and [n.depth for n in sent] == [1, 2, 3, 4]
    settled = []
    observe = drafter.calibration.observe
    drafter.calibration.observe = lambda key, p, accepted: (settled.append(accepted), observe(key, p, accepted))
    drafter.update(0, tokens[:2] + [99])  # two accepted, then the model's own token
    keyed = [i for i, n in enumerate(sent) if n.key is not None]
    assert settled == [i < 2 for i in keyed] and len(keyed) >= 3
    assert drafter._requests[0].sent == []


# ---- the proposer -------------------------------------------------------------------------------------------------
def _propose(proposer, batch, sampled):
    return proposer.propose(sampled, batch.lengths, batch.tokens)


def test_proposer_follows_requests_across_rows(monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_VLLM_STEP_TOKENS", "inf")  # no cost cut: whole chains
    proposer = LookaheadProposer(vllm_config(k=4))
    batch = VllmBatch()
    other = [40, 41, 42, 43, 44, 45, 46, 47, 48, 40, 41]
    batch.put(0, PATTERN + PATTERN[:2] + [PATTERN[2]])  # prompt, then the first sampled token
    batch.put(1, other + [42])
    drafts = _propose(proposer, batch, [[PATTERN[2]], [42]])
    assert drafts == [PATTERN[3:7], [43, 44, 45, 46]]  # each row continues its own prompt, capped at K = 4
    assert sorted(proposer.drafter.running_requests()) == [0, 1] and proposer.stats.requests == 2

    # row 0 accepts two draft tokens and a bonus; row 1 finished and holds a new request; row 2 is prefilling
    batch.commit(0, PATTERN[3:6])
    batch.put(1, [70, 71, 72, 70, 71, 72, 70])
    batch.put(2, [90, 91, 92])
    drafts = _propose(proposer, batch, [PATTERN[3:6], [70], []])
    assert drafts[0] == PATTERN[6:10] and drafts[2] == []
    assert drafts[1] == [71, 72, 70, 71]
    assert sorted(proposer.drafter.running_requests()) == [0, 2]  # request 1 ended, the new one is request 2

    # vLLM condenses the batch: request 0 moves to row 1 and request 2 to row 0; one more token each
    r0, r2 = batch.row(0), batch.row(1)
    batch.put(0, r2 + [71])
    batch.put(1, r0 + [PATTERN[6]])
    batch.put(2, [])
    drafts = _propose(proposer, batch, [[71], [PATTERN[6]]])
    assert sorted(proposer.drafter.running_requests()) == [0, 2] and proposer.stats.requests == 3  # moved, not new
    assert drafts == [[72, 70, 71, 72], PATTERN[7:11]]


def test_proposer_rows_with_identical_tokens_are_two_requests(monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_VLLM_STEP_TOKENS", "inf")
    proposer = LookaheadProposer(vllm_config(k=3))
    batch = VllmBatch()
    for row in (0, 1):
        batch.put(row, PATTERN + [PATTERN[0]])
    assert _propose(proposer, batch, [[PATTERN[0]], [PATTERN[0]]]) == [PATTERN[1:4]] * 2
    assert sorted(proposer.drafter.running_requests()) == [0, 1]
    for row in (0, 1):
        batch.commit(row, PATTERN[1:5])
    assert _propose(proposer, batch, [PATTERN[1:5], PATTERN[1:5]]) == [PATTERN[5:8]] * 2
    assert sorted(proposer.drafter.running_requests()) == [0, 1] and proposer.stats.requests == 2


def test_proposer_caps_drafts_at_the_model_length(monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_VLLM_STEP_TOKENS", "inf")
    proposer = LookaheadProposer(vllm_config(k=8, max_model_len=len(PATTERN) + 4))
    batch = VllmBatch(rows=1, max_model_len=len(PATTERN) + 4)
    batch.put(0, PATTERN + [PATTERN[0]])
    # 12 committed: 2 drafts, then the bonus token, fill the model's 15 positions
    assert _propose(proposer, batch, [[PATTERN[0]]]) == [PATTERN[1:3]]
    batch.commit(0, PATTERN[1:3])
    assert _propose(proposer, batch, [PATTERN[1:3]]) == [[]]  # 14 committed: no room for a draft


def test_proposer_cost_policy(monkeypatch):
    batch = VllmBatch(rows=1)
    batch.put(0, PATTERN + PATTERN[:3])
    monkeypatch.setenv("LOOKAHEAD_VLLM_STEP_TOKENS", "1e-9")  # a token costs a whole step: nothing pays
    assert _propose(LookaheadProposer(vllm_config(k=8)), batch, [[PATTERN[2]]]) == [[]]
    monkeypatch.setenv("LOOKAHEAD_VLLM_STEP_TOKENS", "inf")
    full = _propose(LookaheadProposer(vllm_config(k=8)), batch, [[PATTERN[2]]])[0]
    monkeypatch.setenv("LOOKAHEAD_VLLM_STEP_TOKENS", "2")
    cut = _propose(LookaheadProposer(vllm_config(k=8)), batch, [[PATTERN[2]]])[0]
    assert full == (PATTERN[3:] + PATTERN)[:8] and 0 < len(cut) < len(full) and cut == full[:len(cut)]


def test_proposer_rejects_bad_input(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LookaheadProposer(vllm_config(k=0))
    monkeypatch.setenv("LOOKAHEAD_VLLM_STEP_TOKENS", "cheap")
    with pytest.raises(ValueError, match="LOOKAHEAD_VLLM_STEP_TOKENS must be a number"):
        LookaheadProposer(vllm_config(k=2))
    monkeypatch.delenv("LOOKAHEAD_VLLM_STEP_TOKENS")
    proposer = LookaheadProposer(vllm_config(k=2))
    batch = VllmBatch(rows=2)
    batch.put(0, [1, 2, 3])
    batch.put(1, [1, 2, 3])
    with pytest.raises(ValueError, match="row 1's token_ids_cpu"):
        _propose(proposer, batch, [[3], [4]])
    assert proposer.drafter.running_requests() == []  # row 0 was fine, yet nothing was begun
    with pytest.raises(ValueError, match="num_tokens_no_spec must count"):
        proposer.propose([[1, 2, 3]], np.array([3], dtype=np.int32), batch.tokens)


def test_proposer_loads_and_saves_its_trie(monkeypatch, tmp_path):
    path = tmp_path / "trie.json"
    trie = TokenTrie(branch_length=6)
    trie.insert([50, 51, 52, 53, 54, 55])
    trie.save(path)
    monkeypatch.setenv("LOOKAHEAD_VLLM_TRIE", str(path))
    monkeypatch.setenv("LOOKAHEAD_VLLM_STEP_TOKENS", "inf")
    proposer = LookaheadProposer(vllm_config(k=8))
    assert proposer.drafter.config.branch_length == 6
    batch = VllmBatch(rows=1)
    batch.put(0, [1, 50, 51])
    assert _propose(proposer, batch, [[51]]) == [[52, 53, 54, 55]]  # drafted from the loaded trie alone
    batch.commit(0, [60, 61])
    _propose(proposer, batch, [[60, 61]])
    proposer.save_trie()
    assert TokenTrie.load(path).retrieve([51, 60], 4, max_query_length=2)[0] == [61]  # what it learnt was saved


def test_token_cost_follows_the_measured_step(monkeypatch):
    from lookahead.integrations.vllm import STEP_TOKENS_CPU as TABLES

    STEP_TOKENS_CPU = TABLES["float32"]  # no dtype in the config: fp32's table
    drafter = LookaheadProposer(vllm_config(k=8)).drafter  # priced by vLLM's step through cost(rows, tokens)
    assert drafter.token_cost(1) == pytest.approx(1 / (STEP_TOKENS_CPU[1] + 1))
    assert drafter.token_cost(8) == pytest.approx(1 / (STEP_TOKENS_CPU[8] / 8 + 1))
    mid = STEP_TOKENS_CPU[1] + (STEP_TOKENS_CPU[8] - STEP_TOKENS_CPU[1]) * 3 / 7
    assert drafter.token_cost(4) == pytest.approx(1 / (mid / 4 + 1))
    assert drafter.token_cost(32) == pytest.approx(1 / (STEP_TOKENS_CPU[8] / 32 + 1))  # clamped a / b
    bf16 = vllm_config(k=8)
    bf16.model_config.dtype = "torch.bfloat16"
    assert LookaheadProposer(bf16).drafter.token_cost(1) == pytest.approx(1 / (TABLES["bfloat16"][1] + 1))
    monkeypatch.setenv("LOOKAHEAD_VLLM_STEP_TOKENS", "inf")
    assert LookaheadProposer(vllm_config(k=8)).drafter.token_cost(3) == 0.0
