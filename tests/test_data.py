"""The packaged Spec-Bench questions, their round-robin selection, and prompt encoding."""

import json

import pytest

from lookahead.data import encode_chat, encode_prompt, read_first_turns, spec_bench_first_turns, spec_bench_path

CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
              "translation", "summarization", "qa", "math_reasoning", "rag"]  # in file order


def test_packaged_spec_bench_loads_with_its_license():
    path = spec_bench_path()
    assert path.is_file() and (path.parent / "LICENSE").read_text().startswith("Apache License")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 480
    everything = spec_bench_first_turns(None)
    assert len(everything) == 480
    assert {c for c, _ in everything} == set(CATEGORIES)
    assert {t for _, t in everything} == {r["turns"][0] for r in rows}


def test_round_robin_order_covers_categories_evenly():
    prompts = spec_bench_first_turns(2)
    assert [c for c, _ in prompts] == CATEGORIES * 2
    rows = [json.loads(line) for line in spec_bench_path().read_text().splitlines()]
    firsts = {}
    for r in rows:
        firsts.setdefault(r["category"], []).append(r["turns"][0])
    # rank 0 of every category, then rank 1: the first two questions of each, in file order
    assert prompts[:13] == [(c, firsts[c][0]) for c in CATEGORIES]
    assert prompts[13:] == [(c, firsts[c][1]) for c in CATEGORIES]
    prefix = [c for c, _ in spec_bench_first_turns(4)[:20]]
    assert max(prefix.count(c) for c in CATEGORIES) - min(prefix.count(c) for c in CATEGORIES) <= 1


def test_categories_filter_keeps_file_order():
    prompts = spec_bench_first_turns(3, categories=["rag", "writing"])
    assert [c for c, _ in prompts] == ["writing", "rag"] * 3
    with pytest.raises(ValueError, match="unknown categories poetry; available: writing, roleplay"):
        spec_bench_first_turns(1, categories=["poetry"])


def test_other_files_and_bad_paths(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"category": "a", "turns": ["a1", "a1 again"]}\n{"prompt": "p1"}\n\n'
                    '{"category": "a", "prompt": "a2"}\n')
    assert read_first_turns(path) == [("a", "a1"), ("all", "p1"), ("a", "a2")]
    assert spec_bench_first_turns(5, path=path) == [("a", "a1"), ("all", "p1"), ("a", "a2")]
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        spec_bench_first_turns(1, path=tmp_path / "missing.jsonl")
    path.write_text('{"category": "a"}\n')
    with pytest.raises(ValueError, match=":1 has neither"):
        read_first_turns(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=":1 is not JSON"):
        read_first_turns(path)


def test_encode_prompt_and_chat_go_through_the_chat_template(smollm2):
    _, tokenizer = smollm2
    raw = encode_prompt(tokenizer, "Name a colour.", chat=False)
    assert raw.shape[0] == 1 and tokenizer.decode(raw[0]) == "Name a colour."
    one = encode_prompt(tokenizer, "Name a colour.", chat=True)
    text = tokenizer.decode(one[0])
    assert "Name a colour." in text and text.endswith("<|im_start|>assistant\n")
    history = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
               {"role": "user", "content": "Another?"}]
    many = encode_chat(tokenizer, history)
    text = tokenizer.decode(many[0])
    assert text.index("Name a colour.") < text.index("Blue.") < text.index("Another?")
    assert text.endswith("<|im_start|>assistant\n")
