"""The verify cost curve: measurement, the disk cache (a damaged file is re-measured, not trusted), pricing."""

import json

import pytest

from lookahead import Drafter, LookaheadConfig, TokenTrie
from lookahead.engine import pricing as cost
from lookahead.drafting.drafter import CostModel, StepCost
from lookahead.engine.pricing import calibrate, curve_key, measure_cost_curve
from lookahead.drafting.tree import TREE_BUCKETS


def test_cost_model_prices_relative_to_one_token():
    model = CostModel({1: 0.02, 8: 0.0226, 16: 0.0274})
    assert model(1) == 1.0 and model(8) == pytest.approx(1.13) and model(16) == pytest.approx(1.37)
    assert model(12) == pytest.approx(1.25)  # linear between points
    assert model(24) == pytest.approx(1.37 + 8 * 0.24 / 8)  # and beyond the last
    for bad in ({}, {0: 1.0}, {1: 0.0}, {1: -2.0}):
        with pytest.raises(ValueError, match="cost curve"):
            CostModel(bad)


class FakeClock:
    """time.perf_counter for cost.py, advanced by a fake verify by the seconds a table says a tree size costs."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_verify(model, clock, seconds_of):
    """model.verify replaced: costs seconds_of(T, call number) on the fake clock, computes nothing."""
    calls = {"n": 0}

    def verify(tokens, depths, cache, tree_mask):
        calls["n"] += 1
        clock.now += seconds_of(tokens.shape[1], calls["n"])

    model.verify = verify
    return calls


def test_measured_curve_is_the_median_of_what_each_size_costs(tiny_llama, monkeypatch):
    model, clock = tiny_llama(), FakeClock()
    monkeypatch.setattr(cost.time, "perf_counter", clock)
    table = {1: 0.010, 2: 0.011, 4: 0.013, 8: 0.020}
    # every fifth run of a size is an outlier three times as slow: the median ignores it
    fake_verify(model, clock, lambda T, n: table[T] * (3 if n % 5 == 0 else 1))
    curve = measure_cost_curve(model, [1, 2, 4, 8])
    assert curve == pytest.approx(table)


def test_a_dip_is_measured_again(tiny_llama, monkeypatch):
    model, clock = tiny_llama(), FakeClock()
    monkeypatch.setattr(cost.time, "perf_counter", clock)
    table = {1: 0.010, 4: 0.012, 16: 0.020}
    first_pass_calls = 3 * (1 + cost._RUNS) + cost._RUNS  # warm-up + runs per size, then T=1 again
    # the first pass sees T=16 at 40% of its cost (a dip below 80% of T=4): the curve is measured again
    calls = fake_verify(model, clock, lambda T, n: table[T] * (0.4 if T == 16 and n <= first_pass_calls else 1))
    curve = measure_cost_curve(model, [1, 4, 16])
    assert calls["n"] == 2 * first_pass_calls and curve == pytest.approx(table)


def test_calibrate_caches_on_the_model_and_on_disk(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path))
    model = tiny_llama()
    curve = calibrate(model, 8)
    assert sorted(curve) == [1, 2, 3, 4, 6, 8]
    assert model.state.cost_curves[curve_key(model)] is curve
    saved = json.loads((tmp_path / "cost_curves.json").read_text())
    assert {int(T) for T in saved[curve_key(model)]} == {1, 2, 3, 4, 6, 8}

    def no_measuring(*args):
        raise AssertionError("measured although the curve was cached")

    monkeypatch.setattr(cost, "measure_cost_curve", no_measuring)
    fresh = tiny_llama()  # same shape, device, dtype, threads: the disk cache serves it
    assert calibrate(fresh, 8) == curve


@pytest.mark.parametrize("damage", ["{not json", json.dumps([1, 2]), json.dumps({"k": {"1": -1.0}}), "\x00\x01"])
def test_a_damaged_cache_file_is_measured_again(tiny_llama, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path))
    model = tiny_llama()
    (tmp_path / "cost_curves.json").write_text(damage)
    curve = calibrate(model, 4)
    assert sorted(curve) == [1, 2, 3, 4]
    saved = json.loads((tmp_path / "cost_curves.json").read_text())  # rewritten whole
    assert set(saved[curve_key(model)]) == {"1", "2", "3", "4"}


def test_curve_key_names_what_the_cost_depends_on(tiny_llama, monkeypatch):
    key = curve_key(tiny_llama())
    for part in ("llama-2x32", "cpu", "float32", "threads=", "graphs=0"):
        assert part in key
    from lookahead.kernels import cpu as cpu_ops

    if cpu_ops.available():  # the ops' build: a kernel change is priced by a new measurement
        assert f"cpu_ops={cpu_ops.code_path()}@{cpu_ops.build_id()}" in key and len(cpu_ops.build_id()) == 16


def _drafter_with_likely_continuations(cost):
    """A drafter whose trie has seen one 40-token sequence four times: from its first tokens, long drafts of likely
    nodes are on offer."""
    sequence = list(range(1, 41))
    trie = TokenTrie()
    for _ in range(4):
        trie.insert(sequence)
    drafter = Drafter(LookaheadConfig(decoding_length=32, recycle_top_k=0), trie=trie, step_cost=cost)
    for rid in range(8):
        drafter.begin_request(rid, sequence[:5])
    return drafter, sequence[:5]


def test_step_cost_learns_the_steps_it_sees_and_scales_the_prior_elsewhere():
    cost = StepCost({1: 1.0, 8: 1.1, 64: 2.0})
    assert cost.cost(1, 8) == pytest.approx(1.1) and cost.cost(4, 2) == pytest.approx(1.1)  # nothing seen: B x T
    for _ in range(3):
        cost.observe(1, 1, 0.02)
    assert cost.cost(1, 1) == pytest.approx(0.02)
    assert cost.cost(1, 64) == pytest.approx(0.04)  # the prior's shape in the seen step's seconds
    cost.observe(8, 1, 0.05)
    assert cost.cost(8, 1) == pytest.approx(0.05)
    assert cost.cost(8, 8) == pytest.approx(0.05 * 2.0 / 1.1)  # priced from the nearest B, not from B = 1
    for _ in range(30):
        cost.observe(1, 1, 0.03)  # the machine got slower: recent steps weigh most
    assert cost.cost(1, 1) == pytest.approx(0.03, rel=0.05)


def test_when_measured_steps_say_drafts_never_pay_only_plain_steps_are_drafted():
    cost = StepCost({1: 1.0, 128: 1.0})  # a prior that calls every node free
    for T in TREE_BUCKETS[:10]:
        for _ in range(3):
            cost.observe(1, T, 0.01 * T)  # what the steps really cost: every node a whole step
    drafter, context = _drafter_with_likely_continuations(cost)
    assert drafter.draft(0, context) == ([], [])
    free, _ = _drafter_with_likely_continuations(StepCost({1: 1.0, 128: 1.0}))
    assert len(free.draft(0, context)[0]) > 8  # the same drafter with free nodes drafts deep


def test_a_batch_whose_steps_rise_steeply_gets_smaller_trees_than_one_row():
    cost = StepCost({1: 1.0, 128: 1.0})
    for T in TREE_BUCKETS[:10]:
        for _ in range(3):
            cost.observe(1, T, 0.010 * (1 + 0.02 * T))  # one row: nodes nearly free
            cost.observe(8, T, 0.015 * (1 + 0.5 * T))   # eight rows: each node costs half a step
    drafter, context = _drafter_with_likely_continuations(cost)
    alone = len(drafter.draft(0, context)[0])
    batch = drafter.draft_batch(list(range(8)), [context] * 8)
    assert 0 < max(len(tokens) for tokens, _ in batch) < alone


def test_a_size_between_two_seen_ones_is_priced_on_their_line():
    cost = StepCost({1: 1.0, 8: 1.1, 64: 2.0})
    for _ in range(3):
        cost.observe(8, 1, 0.016)  # 8 rows, 8 tokens: 16 ms
        cost.observe(8, 1.5, 0.022)  # 12 tokens: 22 ms (a compute-bound step: 1.5 ms a token)
    assert cost.cost(8, 10 / 8) == pytest.approx(0.019)  # 10 tokens: on the line, not the prior's flat slope
    assert cost.cost(8, 2) > cost.cost(8, 1.5)  # past the largest seen: the prior's shape, scaled
