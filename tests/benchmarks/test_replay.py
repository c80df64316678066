"""`lookahead replay`: the shipped recording, deterministic floors of the default drafter on it, record/load."""

import gzip
import json
import sys

import pytest
import torch

from lookahead import LookaheadConfig
from lookahead.benchmarks.replay import COPY_HEAVY, CURVES, SHIPPED, load_recording, record, replay


@pytest.fixture(scope="module")
def recording():
    return load_recording(SHIPPED)


def test_the_shipped_recording_covers_every_category(recording):
    header, records = recording
    assert header["model"] == "smollm2-135m-instruct" and header["max_new_tokens"] == 128
    counts = {}
    for r in records:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
        assert len(r["topk"]) == len(r["output_ids"]) and r["topk"][0][0] == r["output_ids"][0]
    assert len(counts) == 13 and min(counts.values()) >= 8


def test_default_drafter_floors_on_the_recording(recording):
    """Numbers, not timing: replay is deterministic. Floors just under what the default config gave on
    2026-11-26 with copy chains (cpu-smollm2: 1.82 tokens/step, 1.62x modeled, extraction 3.58 tokens/step;
    h100-7b: 2.15 tokens/step, 1.81x); before them (2026-11-24) 1.80 and 1.61x, extraction 3.35; 2.09 and 1.77x."""
    _, records = recording
    cpu = replay(records, LookaheadConfig(), CURVES["cpu-smollm2"])
    assert cpu["ALL"].tokens_per_step >= 1.80 and cpu["ALL"].speedup >= 1.60
    assert min(t.speedup for t in cpu.values()) >= 1.2  # no category below plain, with margin
    assert cpu["extraction"].tokens_per_step >= 3.45  # copying from the prompt
    gpu = replay(records, LookaheadConfig(), CURVES["h100-7b"])
    assert gpu["ALL"].tokens_per_step >= 2.12 and gpu["ALL"].speedup >= 1.78
    assert gpu["ALL"].draft_nodes_per_step > cpu["ALL"].draft_nodes_per_step
    cold = replay(records[:26], LookaheadConfig(), CURVES["cpu-smollm2"], warm=False)
    assert 1.0 < cold["ALL"].speedup < replay(records[:26], LookaheadConfig(), CURVES["cpu-smollm2"])["ALL"].speedup


def test_the_copy_heavy_recording():
    header, records = load_recording(COPY_HEAVY)
    assert header["model"] == "smollm2-135m-instruct" and header["max_new_tokens"] == 256 and len(records) >= 24
    counts = {}
    for r in records:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
        assert len(r["topk"]) == len(r["output_ids"]) and r["topk"][0][0] == r["output_ids"][0]
        assert (r["reference_ids"] != []) == (r["category"] == "humaneval")  # the problem is HumanEval's reference
    assert counts == {"rag": 8, "summarization": 8, "extraction": 8, "humaneval": 8}


def test_long_copy_floors_on_the_copy_heavy_recording():
    """Deterministic replay numbers, floors just under what the copy-chain drafter gave on 2026-11-26
    (cpu-smollm2: 3.75 tokens/step, 3.05x, 52 steps accepting 16+ tokens; h100-7b: 4.64, 3.81x, 39 steps accepting
    32+). The trie alone reaches at most branch_length - 1 = 15 tokens below a match: every step accepting 16 or
    more is a copy chain's. Before the copy chains: 3.43 and 2.87x, 4.04 and 3.33x, no step over 15."""
    _, records = load_recording(COPY_HEAVY)
    cpu = replay(records, LookaheadConfig(), CURVES["cpu-smollm2"])
    accepted = [n - 1 for n, steps in cpu["ALL"].step_tokens.items() for _ in range(steps)]  # the bonus is not drafted
    assert cpu["ALL"].tokens_per_step >= 3.7 and cpu["ALL"].speedup >= 3.0
    assert cpu["extraction"].speedup >= 4.3 and cpu["humaneval"].speedup >= 3.3
    assert min(t.speedup for t in cpu.values()) >= 2.4
    assert sum(n >= 16 for n in accepted) >= 45
    gpu = replay(records, LookaheadConfig(), CURVES["h100-7b"])
    accepted = [n - 1 for n, steps in gpu["ALL"].step_tokens.items() for _ in range(steps)]
    assert gpu["ALL"].tokens_per_step >= 4.55 and gpu["ALL"].speedup >= 3.75
    assert min(t.speedup for t in gpu.values()) >= 2.95
    assert sum(n >= 32 for n in accepted) >= 33 and max(accepted) == LookaheadConfig.decoding_length  # a whole 64-draft copy chain (root + 64: ragged steps have no buckets)


def test_policy_and_recycling_each_pay_on_the_recording(recording):
    _, records = recording
    records = records[:39]
    full = replay(records, LookaheadConfig(), CURVES["cpu-smollm2"])["ALL"]
    fixed = replay(records, LookaheadConfig(decoding_length=64), CURVES["cpu-smollm2"], policy=False)["ALL"]
    no_recycling = replay(records, LookaheadConfig(), CURVES["cpu-smollm2"], recycle=False)["ALL"]
    assert full.speedup > fixed.speedup and full.draft_nodes_per_step < fixed.draft_nodes_per_step / 4
    assert full.speedup > no_recycling.speedup


def test_record_then_load(tiny_llama, tmp_path):
    class Ids:  # the part of a tokenizer record() uses for plain (non-chat) prompts and references
        def __call__(self, text, return_tensors=None, add_special_tokens=True):
            class Out:
                input_ids = torch.tensor([[1 + ord(c) % 40 for c in text]])
            return Out()

    model = tiny_llama()
    path = tmp_path / "rec.jsonl.gz"
    record(model, Ids(), [("a", "hello"), ("b", "world!", False, ["wor", "ld"])], path, max_new_tokens=12,
           top_k=3, chat=False, progress=False)
    header, records = load_recording(path)
    assert header["top_k"] == 3 and [r["category"] for r in records] == ["a", "b"]
    assert records[0]["reference_ids"] == [] and records[1]["reference_ids"] == [[1 + ord(c) % 40 for c in "wor"],
                                                                                   [1 + ord(c) % 40 for c in "ld"]]
    for r in records:
        expected = model.generate(torch.tensor([r["prompt_ids"]]), max_new_tokens=12, lookahead=False)
        assert r["output_ids"] == expected[0, len(r["prompt_ids"]):].tolist()
        assert [k[0] for k in r["topk"]] == r["output_ids"] and all(len(k) == 3 for k in r["topk"])
    with pytest.raises(ValueError, match="references must be a list of strings"):
        record(model, Ids(), [("a", "hi", False, "not a list")], tmp_path / "bad.jsonl", progress=False)
    assert not (tmp_path / "bad.jsonl").exists()


def test_bad_recordings(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_recording(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a lookahead replay recording"):
        load_recording(bad)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"format": "something"}) + "\n")
    with pytest.raises(ValueError, match="not a lookahead replay recording"):
        load_recording(foreign)
    with gzip.open(tmp_path / "empty.jsonl.gz", "wt") as f:
        f.write("")
    with pytest.raises(ValueError):
        load_recording(tmp_path / "empty.jsonl.gz")


def test_cli_replay_prints_the_table(capsys):
    from lookahead.cli import main

    assert main(["replay", "run", "--curve", "h100-7b", "--no-recycle"]) == 0
    out = capsys.readouterr().out
    assert "| ALL |" in out and "warm speedup" in out
    assert main(["replay", "run", "--curve", "/nonexistent.json"]) == 2


def test_cli_replays_the_copy_heavy_recording_by_name_and_explains_a_missing_peer(capsys, monkeypatch):
    from lookahead.cli import main

    monkeypatch.setitem(sys.modules, "arctic_inference", None)  # the bench-only peer is not built here
    assert main(["replay", "run", "--recording", "copy-heavy", "--curve", "h100-7b", "--peer", "suffix"]) == 2
    captured = capsys.readouterr()
    assert "smollm2_copy_heavy.jsonl.gz: 32 requests" in captured.out and "| humaneval |" in captured.out
    assert "build.sh OUT_DIR" in captured.err


def test_replay_runs_the_engine_and_each_request_gets_its_recorded_tokens(recording):
    """The stand-in model through the real Engine: every request decodes exactly its recorded output (the prefill's
    token excluded from the decode counts), one request at a time or four in a batch."""
    from lookahead.drafting.drafter import CostModel
    from lookahead.engine.engine import Engine, Sequence
    from lookahead.benchmarks.replay import RecordedModel, relabel

    _, records = recording
    records, vocab = relabel(records[:6])
    for j in (3, 9):  # a top-1 that fp32 rounding put second: the recorded token is still the continuation
        top = records[1]["topk"][j]
        records[1]["topk"][j] = [top[1], top[0]] + top[2:]
    model = RecordedModel(records, vocab)
    engine = Engine(model, 4, model.config.max_position_embeddings, LookaheadConfig(),
                    cost=CostModel(CURVES["cpu-smollm2"]))
    seqs = [Sequence(r["prompt_ids"], len(r["output_ids"])) for r in records[:4]]
    model.admitted += [0, 1, 2, 3]
    engine.add(seqs)
    while engine.busy():
        engine.step()
        model.settle()
        assert len(model.last_shape) == 2 and model.last_shape[0] <= 4
    assert [s.output for s in seqs] == [r["output_ids"] for r in records[:4]]
    assert all(s.finish_reason == "length" for s in seqs) and engine.drafting_requests() == 0
    assert sum(s.steps for s in seqs) < sum(len(r["output_ids"]) for r in records[:4])  # drafts were accepted
    assert all(max(top) < vocab for r in records for top in r["topk"])  # renumbered densely


def test_batched_replay_prices_each_step_at_its_rows(recording):
    _, records = recording
    records = records[:26]
    alone = replay(records, LookaheadConfig(), CURVES["cpu-smollm2"])["ALL"]
    batched = replay(records, LookaheadConfig(), CURVES["cpu-smollm2"], batch=4)["ALL"]
    assert alone.tokens == batched.tokens == sum(len(r["output_ids"]) - 1 for r in records)
    assert alone.requests == batched.requests == 26
    # a batch-1 curve prices B rows x T nodes as one row's B * T: on the CPU curve a batch drafts fewer nodes per row
    assert batched.draft_nodes_per_step < alone.draft_nodes_per_step
    assert sum(alone.step_tokens.values()) == alone.steps and sum(n * c for n, c in alone.step_tokens.items()) == \
        alone.tokens
    with pytest.raises(ValueError, match="batch"):
        replay(records, LookaheadConfig(), CURVES["cpu-smollm2"], batch=0)
    with pytest.raises(ValueError, match="one request at a time"):
        replay(records, LookaheadConfig(), CURVES["cpu-smollm2"], warm=False, batch=2)


def test_the_suffix_decoding_peer_replays_through_the_same_engine(recording, monkeypatch):
    """The bench-only peer behind the drafter interface, with a stand-in for its suffix cache that drafts a fixed
    guess: plain steps when it drafts nothing, the recorded accounting when it drafts."""
    import types

    class Cache:
        def __init__(self, max_tree_depth):
            self.responses = {}

        def start_request(self, rid, local):
            self.responses[rid] = []

        def add_active_response(self, rid, tokens):
            self.responses[rid] += tokens

        def speculate(self, rid, context, max_spec_tokens, max_spec_factor, min_token_prob, use_tree_spec):
            guess = [] if max_spec_tokens < 8 else [context[-1]] * 2  # repeat the last token twice, as a chain
            return types.SimpleNamespace(token_ids=guess, parents=list(range(-1, len(guess) - 1)))

        def stop_request(self, rid):
            del self.responses[rid]

    module = types.ModuleType("arctic_inference.suffix_decoding")
    module.SuffixDecodingCache = Cache
    monkeypatch.setitem(sys.modules, "arctic_inference", types.ModuleType("arctic_inference"))
    monkeypatch.setitem(sys.modules, "arctic_inference.suffix_decoding", module)
    from lookahead.benchmarks.replay import SuffixDecodingDrafter, best_suffix_decoding

    _, records = recording
    records = records[:13]
    tokens = sum(len(r["output_ids"]) - 1 for r in records)
    config, curve = LookaheadConfig(), CURVES["h100-7b"]
    plain = replay(records, config, curve, drafter=SuffixDecodingDrafter(4))["ALL"]
    assert plain.steps == plain.tokens == tokens and plain.speedup == 1.0 and plain.draft_nodes == 0
    guessing = replay(records, config, curve, drafter=SuffixDecodingDrafter(8))["ALL"]
    assert guessing.draft_nodes_per_step == 2.0 and guessing.tokens == tokens  # every step verified its chain
    steps = 0  # the oracle: the chain [last, last] is accepted as far as the recording repeats its last token
    for r in records:
        out, pos = r["output_ids"], 1
        while pos < len(out):
            accepted = 0
            while accepted < 2 and pos + accepted < len(out) and out[pos + accepted] == out[pos - 1]:
                accepted += 1
            pos, steps = pos + accepted + 1, steps + 1
    assert guessing.steps == steps
    best = best_suffix_decoding(records, curve)
    assert set(best) == {r["category"] for r in records} | {"ALL"} and best["ALL"][1].speedup >= 1.0
