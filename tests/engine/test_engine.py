"""The engine alone (tiny random models): rows joining and leaving between steps, each equal to generate() alone;
bad input changes nothing; a failing prefill or step fails only its request; the exact switch reaches the model."""

import pytest
import torch

from lookahead import LookaheadConfig
from lookahead.drafting.drafter import CostModel
from lookahead.engine.engine import Engine, Sequence
from lookahead.engine.sampling import SamplingParams
from tests.helpers import TINY_VOCAB, make_tiny_llama


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, ids: list[int], n: int, **kw) -> list[int]:
    return model.generate(torch.tensor([ids]), max_new_tokens=n, lookahead=False, eos_token_id=[], **kw)[0, len(ids):].tolist()


def run_to_end(engine: Engine, seqs: list[Sequence]) -> None:
    while not all(s.finished for s in seqs):
        engine.step()


def test_requests_join_and_leave_between_steps_and_each_equals_generate_alone():
    model = make_tiny_llama(3)
    engine = Engine(model, max_batch=3, max_context=80, lookahead=LookaheadConfig(adaptive=False, decoding_length=8))
    a, b = Sequence(prompt(1, 5), 30), Sequence(prompt(2, 9), 12)
    engine.add([a, b])
    for _ in range(4):
        engine.step()
    c = Sequence(prompt(3, 7), 20, SamplingParams(do_sample=True, temperature=0.9, top_k=5, seed=7))
    engine.add([c])  # joins while a and b run; b may have left already
    d = Sequence(prompt(4, 6), 25)
    engine.step()
    engine.remove(a, "cancelled")  # a leaves early: its row is free at once
    assert a.finish_reason == "cancelled" and a.row is None and engine.free_rows() >= 1
    engine.add([d])
    run_to_end(engine, [b, c, d])
    assert engine.free_rows() == 3 and engine.drafting_requests() == 0 and int(engine.active.sum()) == 0
    assert b.output == alone(model, b.prompt, 12) and d.output == alone(model, d.prompt, 25)
    assert c.output == alone(model, c.prompt, 20, do_sample=True, temperature=0.9, top_k=5, seed=7)
    assert a.output == alone(model, a.prompt, 30)[:len(a.output)]


def test_bad_input_changes_nothing():
    model = make_tiny_llama(0)
    engine = Engine(model, max_batch=2, max_context=40)
    running = Sequence(prompt(1, 5), 10)
    engine.add([running])
    for bad, match in (([Sequence(prompt(2, 30), 20)], "exceeds"), ([Sequence([], 3)], "non-empty"),
                       ([Sequence([TINY_VOCAB], 3)], "token ids"), ([Sequence(prompt(3, 4), 0)], "max_new_tokens"),
                       ([Sequence(prompt(4, 4), 3), Sequence(prompt(5, 4), 3)], "free rows")):
        with pytest.raises(ValueError, match=match):
            engine.add(bad)
        assert engine.free_rows() == 1 and engine.busy() == [running]
    with pytest.raises(ValueError, match="idle"):
        engine.configure(LookaheadConfig())
    run_to_end(engine, [running])
    assert running.output == alone(model, running.prompt, 10)


def test_a_failing_prefill_or_step_fails_only_its_request(monkeypatch):
    model = make_tiny_llama(1)
    engine = Engine(model, max_batch=4, max_context=60, isolate_failures=True)
    assert engine.prefill_in_steps  # the CPU path: a prefill is a verify chain of the ragged step
    bad_prompt = prompt(9, 6)
    verify = model.verify_ragged

    def faulty_prefill(tokens, rows, nodes, depths, cache, tree_mask, logit_index=None):
        flat = tokens.tolist()
        if any(flat[i:i + len(bad_prompt)] == bad_prompt for i in range(len(flat))):
            raise RuntimeError("injected prefill fault")
        return verify(tokens, rows, nodes, depths, cache, tree_mask, logit_index)

    monkeypatch.setattr(model, "verify_ragged", faulty_prefill)
    good, bad = Sequence(prompt(1, 5), 12), Sequence(bad_prompt, 12)
    events = engine.add([good, bad])
    assert bad.finish_reason == "error" and "injected prefill fault" in bad.error and bad.row is None
    assert [s for s, _ in events] == [good]
    monkeypatch.undo()

    victim = Sequence(prompt(2, 7), 12)
    engine.add([victim])

    def faulty_verify(tokens, rows, nodes, depths, cache, tree_mask, logit_index=None):
        if cache.lens.shape[0] == 1 and cache.lens.data_ptr() == engine.cache.lens[victim.row:].data_ptr():
            raise RuntimeError("injected step fault")  # the victim's row, alone
        if cache.lens.shape[0] > 1:
            raise RuntimeError("the batched step fails")  # so every row is retried alone
        return verify(tokens, rows, nodes, depths, cache, tree_mask, logit_index)

    monkeypatch.setattr(model, "verify_ragged", faulty_verify)
    engine.step()
    monkeypatch.undo()
    assert victim.finish_reason == "error" and "injected step fault" in victim.error
    run_to_end(engine, [good])
    assert good.output == alone(model, good.prompt, 12)


def test_exact_config_turns_the_models_batch_invariant_forwards_on():
    model = make_tiny_llama(2)
    ids = torch.tensor([prompt(5, 6)])
    plain = model.generate(ids, max_new_tokens=20, lookahead=False, eos_token_id=[])
    assert not model.exact
    out = model.generate(ids, max_new_tokens=20, lookahead=LookaheadConfig(exact=True), eos_token_id=[])
    assert model.exact and out.tolist() == plain.tolist()  # the CPU path is exact already: same tokens
    assert model.generate(ids, max_new_tokens=20, lookahead=False, eos_token_id=[]).tolist() == plain.tolist()
    model.set_exact(False)
    assert not model.exact


def test_an_engine_made_under_inference_mode_serves_later_calls_outside_it():
    model = make_tiny_llama(4)
    ids = torch.tensor([prompt(6, 5)])
    with torch.inference_mode():  # the model's engine is built here
        first = model.generate(ids, max_new_tokens=8, lookahead=False, eos_token_id=[], repetition_penalty=1.3)
    again = model.generate(ids, max_new_tokens=8, lookahead=False, eos_token_id=[], repetition_penalty=1.3)
    assert again.tolist() == first.tolist()


def test_long_prompts_are_prefilled_in_chunks_with_the_same_bits():
    """Prompts longer than a chunk (rows of 5, 23 and 40 tokens, 12 prompt tokens per step, oldest row first): the
    cache holds each prompt's K/V and its length bit for bit as one unchunked step does, and every row decodes the
    same tokens."""
    model = make_tiny_llama(5)
    prompts = [prompt(11, 5), prompt(12, 23), prompt(13, 40)]

    def run(chunk_tokens):
        calls = []
        verify = model.verify_ragged
        engine = Engine(model, max_batch=3, max_context=80, lookahead=LookaheadConfig(adaptive=False),
                        prefill_chunk=chunk_tokens)
        model.verify_ragged = lambda *a: calls.append(a[0].shape[0]) or verify(*a)
        try:
            seqs = [Sequence(p, 12) for p in prompts]
            first = engine.add(seqs)
        finally:
            del model.verify_ragged
        lens = engine.cache.lens.tolist()
        kv = engine.cache.buffer.clone()
        run_to_end(engine, seqs)
        return first, lens, kv, [s.output for s in seqs], calls

    first, lens, kv, outputs, calls = run(12)
    assert calls == [12] * 5 + [8]  # 5 + 7 | 12 | 4 + 8 | 12 | 12 | 8 of row 40's, flattened: no padding
    assert lens == [5, 23, 40]  # each prompt in its row (the first token's K/V come with the next step)
    first_whole, lens_whole, kv_whole, outputs_whole, calls_whole = run(10_000)
    assert calls_whole == [68] and lens_whole == lens
    assert [t for _, t in first] == [t for _, t in first_whole] and outputs == outputs_whole
    for row, n in enumerate(lens):
        assert torch.equal(kv[:, :, row, :, :n], kv_whole[:, :, row, :, :n])


def test_a_deferred_prefill_rides_in_the_running_rows_steps():
    """add(defer=True): a long prompt is prefilled a chunk per step beside a decoding row; neither row's tokens
    change, no step carries more prompt tokens than prefill_chunk, and the new row's first token is an event."""
    model = make_tiny_llama(6)
    running, late = Sequence(prompt(14, 6), 20), Sequence(prompt(15, 37), 10)
    engine = Engine(model, max_batch=2, max_context=80, lookahead=LookaheadConfig(adaptive=False), prefill_chunk=8)
    engine.add([running])
    engine.step()
    assert engine.add([late], defer=True) == [] and late.prefilled == 0 and not late.output
    sizes, verify = [], model.verify_ragged
    model.verify_ragged = lambda *a: sizes.append((a[1] == late.row).sum().item()) or verify(*a)
    try:
        firsts = []
        while late.prefilled < len(late.prompt):
            events = engine.step()
            assert running in [s for s, _ in events]  # the running row decodes every step
            firsts += [new for s, new in events if s is late]
    finally:
        del model.verify_ragged
    assert sizes == [8, 8, 8, 8, 5] and firsts == [late.output[:1]]  # 37 prompt tokens, the first token with the last
    run_to_end(engine, [running, late])
    assert running.output == alone(model, running.prompt, 20)
    assert late.output == alone(model, late.prompt, 10)


@pytest.mark.live_gate
def test_the_gate_decodes_plain_where_drafting_costs_more_per_token_and_still_probes_it():
    """The engine keeps, per row count and kind of step (prompt chunks in it or not), the seconds per committed
    token of steps with and without drafting: where drafting costs more it drafts only every GATE_PROBE-th step
    (to keep measuring it), where it costs less it decodes plain only that often; an unmeasured row count follows
    the nearest measured one of its kind. Replay's fixed price has no gate (its figures stay deterministic)."""
    import lookahead.engine.pricing as cost_module

    model = make_tiny_llama(7)
    engine = Engine(model, max_batch=4, max_context=60, lookahead=LookaheadConfig())
    probe = cost_module.GATE_PROBE
    decisions = [engine.gate_open(2, False) for _ in range(probe)]
    assert decisions == [True] * (probe - 1) + [False]  # nothing measured: draft, then try plain once
    engine.gate.learn(2, False, True, seconds=0.030, tokens=3)   # 10 ms a token drafting
    engine.gate.learn(2, False, False, seconds=0.016, tokens=2)  # 8 ms plain
    decisions = [engine.gate_open(2, False) for _ in range(4 * probe)]
    assert sum(decisions) == 4  # plain, bar one probe in GATE_PROBE
    assert sum(engine.gate_open(3, False) for _ in range(probe)) == 1  # 3 rows follow 2 rows, probing drafting
    assert engine.gate_open(2, True)  # a step with prompt chunks is another kind: not measured yet, it drafts
    for _ in range(40):  # drafting got cheap: the decayed sums move, then the gate flips
        engine.gate.learn(2, False, True, seconds=0.012, tokens=3)
    decisions = [engine.gate_open(2, False) for _ in range(4 * probe)]
    assert sum(decisions) == 4 * probe - 4
    fixed = Engine(model, max_batch=2, max_context=60, lookahead=LookaheadConfig(), cost=CostModel({1: 1.0}))
    fixed.gate.learn(2, False, True, seconds=1.0, tokens=1)
    fixed.gate.learn(2, False, False, seconds=0.001, tokens=1)
    assert all(fixed.gate_open(2, False) for _ in range(2 * probe))


@pytest.mark.live_gate
def test_the_gate_learns_the_seconds_of_the_engines_own_clock():
    """The engine times its steps with the clock it is given: each step feeds the gate its seconds and committed
    tokens, so a fake clock that ticks 10 ms per reading shows up, exactly, as the gate's seconds per token."""
    model = make_tiny_llama(3)
    readings = []

    def clock():
        readings.append(0.010 * len(readings))
        return readings[-1]

    engine = Engine(model, max_batch=2, max_context=60, lookahead=LookaheadConfig(), clock=clock)
    seq = Sequence(list(range(1, 9)), max_new_tokens=12)
    engine.add([seq])
    learned = []
    real_learn = engine.gate.learn
    engine.gate.learn = lambda rows, kind, drafted, seconds, tokens: (learned.append((seconds, tokens)),
                                                                      real_learn(rows, kind, drafted, seconds, tokens))
    while not seq.finished:
        engine.step()
    # a step reads the clock at its start, around its device work and its commit, and at its end: 4 ticks
    assert learned and all(abs(seconds - 0.040) < 1e-9 for seconds, _ in learned)
    drafted, plain = engine.gate.per_token(1, False)
    measured = [p for p in (drafted, plain) if p is not None]
    assert measured and all(0.040 / 12 <= p <= 0.040 for p in measured)


def test_the_step_names_its_parts_in_torch_profilers_trace():
    """draft, verify, accept, compact and commit appear as ranges of a torch.profiler trace of a lookahead step
    (on CUDA with LOOKAHEAD_NVTX=1 the same names go to Nsight instead)."""
    from torch.profiler import profile

    model = make_tiny_llama()
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])
    fixed = LookaheadConfig(adaptive=False, decoding_length=8)  # drafts whatever the step costs here
    model.generate(prompt, max_new_tokens=4, lookahead=fixed)  # warm: the trie has the repeats, the engine exists
    with profile() as prof:
        model.generate(prompt, max_new_tokens=8, lookahead=fixed)
    names = {e.name for e in prof.events()}
    assert {"draft", "verify", "accept", "compact", "commit"} <= names
