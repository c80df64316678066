"""Chain drafters replayed as vLLM runs them (without vLLM): vLLM's ngram written again against a transcription of
its KMP search, the proposer driven through the engine with vLLM-shaped calls, and the proposer's timing gate."""

import random

import numpy as np
import pytest

from lookahead.config import LookaheadConfig
from lookahead.integrations.vllm import LinearStep, LookaheadProposer
from lookahead.benchmarks.replay import ProposerRows, VllmNgram, compare, vllm_ngram
from lookahead.benchmarks.replay import replay


def _kmp_ngram(tokens, min_n, max_n, k):
    """vLLM 0.32's search as it is written there (reversed tokens, a prefix function capped at max_n; the longest
    match wins, ties go to the earliest position in the original order): the oracle for `vllm_ngram`."""
    total = len(tokens)
    if total < min_n:
        return []
    rev = tokens[::-1]
    lps = [0] * max_n
    longest, position, prev, i = 0, 0, 0, 1
    while i < total:
        if rev[prev] == rev[i]:
            prev += 1
            if prev >= longest:
                longest, position = prev, i
            if i < max_n:
                lps[i] = prev
            if prev == max_n:
                prev = lps[max_n - 1]
            i += 1
        elif prev:
            prev = lps[prev - 1]
        else:
            i += 1
    if longest < min_n:
        return []
    start = total - 1 - position + longest
    return list(tokens[start:start + min(k, total - start)])


def test_vllm_ngram_is_vllms_search():
    rng = random.Random(3)
    for trial in range(400):
        vocab = rng.choice([2, 3, 5, 12])
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        min_n = rng.randrange(1, 4)
        max_n = rng.randrange(min_n, 6)
        k = rng.randrange(1, 9)
        ours = vllm_ngram(np.array(tokens, dtype=np.int32), min_n, max_n, k).tolist()
        assert ours == _kmp_ngram(tokens, min_n, max_n, k), (tokens, min_n, max_n, k)
    # the earliest occurrence of the longest suffix, and no draft past the model's length
    assert vllm_ngram(np.array([1, 2, 9, 1, 2, 8, 1, 2]), 2, 4, 3).tolist() == [9, 1, 2]
    assert vllm_ngram(np.array([1, 2, 9, 1, 2, 8, 1, 2]), 2, 4, 3, max_model_len=9).tolist() == [9]


def _records():
    """A recording whose outputs repeat their prompts' phrases (and each other's), in two categories."""
    rng = random.Random(5)
    phrases = [[rng.randrange(100, 400) for _ in range(12)] for _ in range(4)]
    records = []
    for i in range(6):
        prompt = [1, 2] + phrases[i % 4] + [3] + phrases[(i + 1) % 4]
        output = phrases[i % 4][:8] + [rng.randrange(400, 500)] + phrases[(i + 1) % 4] + phrases[(i + 2) % 4][:6]
        records.append({"category": "a" if i % 2 else "b", "prompt_ids": prompt, "output_ids": output,
                        "topk": [[t] for t in output]})
    return records


def test_chain_drafters_replay_through_the_engine_as_vllm_calls_them():
    records = _records()
    step = LinearStep({1: 20.0, 8: 40.0})
    results = compare(records, batch=2, k=6, step=step, ngram_k=(3, 6))
    assert set(results) == {"ngram K=3", "ngram K=6", "lookahead K=6"}
    produced = sum(len(r["output_ids"]) - 1 for r in records)  # the prefill's token is not a decode step's
    for method, groups in results.items():
        assert groups["ALL"].tokens == produced  # every recorded token, each step checked against the recording
        assert groups["ALL"].requests == len(records)
        assert groups["ALL"].tokens_per_step > 1.3, method  # the outputs copy their prompts
    # ngram K=6 drafts exactly what vLLM's search returns: replay it by hand for the first request, one row
    ngram = replay(records[:1], LookaheadConfig(decoding_length=16), step, drafter=ProposerRows(VllmNgram(6)))
    context, steps, out = list(records[0]["prompt_ids"]), 0, records[0]["output_ids"]
    done = 1  # the prefill commits the first token
    context.append(out[0])
    while done < len(out):
        draft = vllm_ngram(np.array(context), 2, 4, 6).tolist()
        accepted = 0
        while accepted < len(draft) and done + accepted < len(out) and draft[accepted] == out[done + accepted]:
            accepted += 1
        take = min(accepted + 1, len(out) - done)
        context += out[done:done + take]
        done += take
        steps += 1
    assert ngram["ALL"].steps == steps


def test_proposer_rows_packs_decoding_rows_and_passes_what_they_sampled():
    calls = []

    class Spy:
        def propose(self, sampled, lengths, tokens):
            calls.append(([list(s) for s in sampled], lengths.tolist(), [tokens[i, :n].tolist()
                                                                         for i, n in enumerate(lengths)]))
            return [[7, 8]] * len(sampled)

    rows = ProposerRows(Spy())
    rows.begin_request(10, [1, 2, 3])
    rows.begin_request(11, [4, 5])
    rows.update(10, [6])
    out = rows.draft_batch([10, -1, 11], [[1, 2, 3, 6], None, [4, 5]])
    assert out == [([7, 8], [0, 1]), ([], []), ([7, 8], [0, 1])]  # node 1's parent is the root, node 2's node 1
    assert calls[-1] == ([[6], []], [4, 2], [[1, 2, 3, 6], [4, 5]])
    rows.update(10, [7, 8])
    rows.end_request(11)
    rows.draft_batch([10], [[1, 2, 3, 6, 7, 8]])
    assert calls[-1] == ([[7, 8]], [6], [[1, 2, 3, 6, 7, 8]])
    assert rows.running_requests() == [10]


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_proposer_gate_drafts_only_where_vllms_steps_pay(monkeypatch):
    """The proposer times vLLM's steps between its calls: where steps that verified drafts cost more per committed
    token than plain ones it proposes nothing, bar one probe in GATE_PROBE; steps that admit or end requests are
    not measured."""
    from lookahead.engine.pricing import GATE_PROBE

    monkeypatch.setenv("LOOKAHEAD_VLLM_STEP_TOKENS", "inf")  # no cost cut: the gate alone decides
    clock = _Clock()
    proposer = LookaheadProposer(num_speculative_tokens=4, gate=True, clock=clock)
    pattern = [5, 6, 7, 8, 9, 10, 11, 12]
    tokens = np.zeros((1, 4096), dtype=np.int32)
    context = pattern * 3
    tokens[0, :len(context)] = context
    sampled = [[context[-1]]]

    def step(seconds_if_drafted, seconds_plain):
        nonlocal sampled
        draft = proposer.propose(sampled, np.array([len(context)]), tokens)[0]
        clock.now += seconds_if_drafted if draft else seconds_plain
        new = [pattern[len(context) % len(pattern)]]  # the model accepts nothing: one token a step
        context.extend(new)
        tokens[0, len(context) - 1] = new[0]
        sampled = [new]
        return bool(draft)

    drafted = [step(0.05, 0.03) for _ in range(6 * GATE_PROBE)]
    assert drafted[0]  # nothing measured: it drafts first
    assert sum(drafted[2 * GATE_PROBE:]) == 4  # then plain, bar one probe in GATE_PROBE
    on, off = proposer.gate.per_token(1)
    assert on == pytest.approx(0.05) and off == pytest.approx(0.03)
    # a new request in the batch: that step is not measured
    before = proposer.gate.per_token(1)
    proposer.propose([[1], [context[-1]]], np.array([3, len(context)]), np.vstack([[[9, 9, 1] + [0] * 4093], tokens]))
    assert proposer.gate.per_token(1) == before and proposer.gate.per_token(2) == (None, None)
    off_gate = LookaheadProposer(num_speculative_tokens=4, gate=False, clock=clock)
    assert off_gate.gate is None
