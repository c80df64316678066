"""`lookahead replay`: the shipped recording, deterministic floors of the default drafter on it, record/load."""

import gzip
import json

import pytest
import torch

from lookahead import LookaheadConfig
from lookahead.replay import CURVES, SHIPPED, load_recording, record, replay


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
    2026-11-24 (cpu-smollm2: 1.80 tokens/step, 1.61x modeled; h100-7b: 2.08 tokens/step, 1.76x)."""
    _, records = recording
    cpu = replay(records, LookaheadConfig(), CURVES["cpu-smollm2"])
    assert cpu["ALL"].tokens_per_step >= 1.78 and cpu["ALL"].speedup >= 1.58
    assert min(t.speedup for t in cpu.values()) >= 1.2  # no category below plain, with margin
    assert cpu["extraction"].tokens_per_step >= 3.0  # copying from the prompt
    gpu = replay(records, LookaheadConfig(), CURVES["h100-7b"])
    assert gpu["ALL"].speedup >= 1.72 and gpu["ALL"].draft_nodes_per_step > cpu["ALL"].draft_nodes_per_step
    cold = replay(records[:26], LookaheadConfig(), CURVES["cpu-smollm2"], warm=False)
    assert 1.0 < cold["ALL"].speedup < replay(records[:26], LookaheadConfig(), CURVES["cpu-smollm2"])["ALL"].speedup


def test_policy_and_recycling_each_pay_on_the_recording(recording):
    _, records = recording
    records = records[:39]
    full = replay(records, LookaheadConfig(), CURVES["cpu-smollm2"])["ALL"]
    fixed = replay(records, LookaheadConfig(decoding_length=64), CURVES["cpu-smollm2"], policy=False)["ALL"]
    no_recycling = replay(records, LookaheadConfig(), CURVES["cpu-smollm2"], recycle=False)["ALL"]
    assert full.speedup > fixed.speedup and full.draft_nodes_per_step < fixed.draft_nodes_per_step / 4
    assert full.speedup > no_recycling.speedup


def test_record_then_load(tiny_llama, tmp_path):
    class Ids:  # the part of a tokenizer record() uses for plain (non-chat) prompts
        def __call__(self, text, return_tensors=None):
            class Out:
                input_ids = torch.tensor([[1 + ord(c) % 40 for c in text]])
            return Out()

    model = tiny_llama()
    path = tmp_path / "rec.jsonl.gz"
    record(model, Ids(), [("a", "hello"), ("b", "world!")], path, max_new_tokens=12, top_k=3, chat=False,
           progress=False)
    header, records = load_recording(path)
    assert header["top_k"] == 3 and [r["category"] for r in records] == ["a", "b"]
    for r in records:
        expected = model.generate(torch.tensor([r["prompt_ids"]]), max_new_tokens=12, lookahead=False)
        assert r["output_ids"] == expected[0, len(r["prompt_ids"]):].tolist()
        assert [k[0] for k in r["topk"]] == r["output_ids"] and all(len(k) == 3 for k in r["topk"])


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
