"""`lookahead replay`: the shipped recording, deterministic floors of the default drafter on it, record/load."""

import gzip
import json
import sys

import pytest
import torch

from lookahead import LookaheadConfig
import lookahead.replay as replay_module
from lookahead.replay import COPY_HEAVY, CURVES, SHIPPED, load_recording, record, replay


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


def test_long_copy_floors_on_the_copy_heavy_recording(monkeypatch):
    """Deterministic replay numbers, floors just under what the copy-chain drafter gave on 2026-11-26
    (cpu-smollm2: 3.75 tokens/step, 3.05x, 52 steps accepting 16+ tokens; h100-7b: 4.64, 3.81x, 39 steps accepting
    32+). The trie alone reaches at most branch_length - 1 = 15 tokens below a match: every step accepting 16 or
    more is a copy chain's. Before the copy chains: 3.43 and 2.87x, 4.04 and 3.33x, no step over 15."""
    _, records = load_recording(COPY_HEAVY)
    accepted = []
    count = replay_module.accepted_length
    monkeypatch.setattr(replay_module, "accepted_length", lambda *a: accepted.append(count(*a)) or accepted[-1])
    cpu = replay(records, LookaheadConfig(), CURVES["cpu-smollm2"])
    assert cpu["ALL"].tokens_per_step >= 3.7 and cpu["ALL"].speedup >= 3.0
    assert cpu["extraction"].speedup >= 4.3 and cpu["humaneval"].speedup >= 3.3
    assert min(t.speedup for t in cpu.values()) >= 2.4
    assert sum(n >= 16 for n in accepted) >= 45
    accepted.clear()
    gpu = replay(records, LookaheadConfig(), CURVES["h100-7b"])
    assert gpu["ALL"].tokens_per_step >= 4.55 and gpu["ALL"].speedup >= 3.75
    assert min(t.speedup for t in gpu.values()) >= 2.95
    assert sum(n >= 32 for n in accepted) >= 33 and max(accepted) == 63  # a 64-node tree's whole copy chain


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
