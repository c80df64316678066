"""`lookahead bench-llamacpp`: argument checks, the summary arithmetic, and (slow, with .venv-llamacpp) one small run
of each suite end to end."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from lookahead.benchmarks import llamacpp_bench as lb
from lookahead.benchmarks.llamacpp_runner import _until_eos
from lookahead.config import cache_dir

LLAMACPP_PYTHON = Path(__file__).resolve().parents[2] / ".venv-llamacpp" / "bin" / "python"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    lb.add_arguments(parser)
    return parser.parse_args(list(argv))


def fake_python(tmp_path: Path) -> str:
    python = tmp_path / "python"
    python.write_text("")
    return str(python)


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads must be >= 1"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--prompts", "0"], "--prompts must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--lookup-tokens", "0"], "--lookup-tokens must be >= 1"),
    (["--tokens", "1"], "--tokens must be >= 2"),
    (["--text-tokens", "1"], "--text-tokens must be >= 2"),
])
def test_bad_numbers_name_their_flag(tmp_path, argv, message):
    args = parse("--suite", "smollm2", "--llamacpp-python", fake_python(tmp_path), *argv)
    with pytest.raises(ValueError, match=message):
        lb.validate(args)


def test_suites_check_their_files(tmp_path):
    python = fake_python(tmp_path)
    with pytest.raises(ValueError, match="--suite decode needs --gguf"):
        lb.validate(parse("--suite", "decode", "--llamacpp-python", python))
    with pytest.raises(ValueError, match="--types, not --gguf"):
        lb.validate(parse("--suite", "smollm2", "--gguf", python, "--llamacpp-python", python))
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        lb.validate(parse("--suite", "quality", "--gguf", str(tmp_path / "missing.gguf"), "--llamacpp-python", python))
    with pytest.raises(FileNotFoundError, match="make llamacpp-venv"):
        lb.validate(parse("--suite", "quality", "--llamacpp-python", str(tmp_path / "absent")))
    lb.validate(parse("--suite", "decode", "--gguf", python, "--llamacpp-python", python))  # a valid one passes


def test_until_eos_cuts_at_the_first_eos():
    assert _until_eos([5, 6, 2, 7, 2], [2]) == [5, 6]
    assert _until_eos([5, 6], [2]) == [5, 6]
    assert _until_eos([3, 5], [9, 3]) == []


def test_best_runs_keeps_the_least_seconds_per_prompt():
    rounds = [[{"tokens": [1, 2], "seconds": 3.0, "steps": 2}, {"tokens": [4], "seconds": 1.0, "steps": 1}],
              [{"tokens": [1, 2], "seconds": 2.0, "steps": 2}, {"tokens": [5], "seconds": 4.0, "steps": 1}]]
    best = lb.best_runs(rounds)
    assert [b["seconds"] for b in best] == [2.0, 1.0]
    assert [b["tokens"] for b in best] == [[1, 2], [4]]  # the first round's
    assert [b["rounds_differ"] for b in best] == [False, True]


def run(tokens, seconds, steps):
    return {"tokens": tokens, "seconds": seconds, "steps": steps, "rounds_differ": False}


def test_summarize_generation():
    runs = {"ours plain": [run([1, 2, 3, 4], 4.0, 4), run([5, 6], 2.0, 2)],
            "ours lookahead": [run([1, 2, 3, 4], 2.0, 2), run([5, 7], 1.0, 1)],
            "llama.cpp plain": [run([1, 2, 3, 4], 3.0, 4), run([5, 6], 3.0, 2)],
            "llama.cpp lookup": [run([1, 2, 3, 4], 2.0, 2), run([5, 6], 2.0, 2)]}
    s = lb.summarize_generation(runs)
    assert s["prompts"] == 2
    plain = s["systems"]["ours plain"]
    assert (plain["tokens"], plain["seconds"], plain["tokens_per_s"], plain["ms_per_token"]) == (6, 6.0, 1.0, 1000.0)
    assert s["systems"]["ours lookahead"]["tokens_per_step"] == 2.0
    assert s["systems"]["llama.cpp lookup"]["tokens_per_step"] == 1.5
    assert s["speedups"] == pytest.approx({"ours lookahead / ours plain": 2.0, "llama.cpp lookup / llama.cpp plain": 1.5,
                                           "ours plain / llama.cpp plain": 1.0, "ours lookahead / llama.cpp lookup": 4 / 3})
    assert s["identical"] == {"ours lookahead / ours plain": 1, "llama.cpp lookup / llama.cpp plain": 2,
                              "ours plain / llama.cpp plain": 2}


def test_identical_needs_the_same_prompts():
    with pytest.raises(ValueError, match="ran 1 and 2 prompts"):
        lb.identical([run([1], 1.0, 1)], [run([1], 1.0, 1)] * 2)


def test_summarize_decode_speed_is_llamacpp_time_over_ours():
    row = lb.summarize_decode("f.gguf", 2_000_000, 1, {"ms_per_token": 40.0}, {"ms_per_token": 30.0})
    assert row["speed_vs_llamacpp"] == 0.75 and row["mb"] == 2.0


def test_agreement():
    a = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    b = a.copy()
    b[1] = [0.0, 2.5, 0.0]  # another argmax: |diff| 2 and 2.5
    b[3, 0] = 0.5  # the same argmax, |diff| 0.5
    got = lb.agreement(a, b)
    assert got["top1_agreement"] == 0.75
    assert got["max_abs_diff"] == 2.5
    assert got["mean_abs_diff"] == pytest.approx(5.0 / 12)
    assert lb.agreement(a, a) == {"top1_agreement": 1.0, "max_abs_diff": 0.0, "mean_abs_diff": 0.0}
    with pytest.raises(ValueError, match="cannot be compared"):
        lb.agreement(a, a[:2])


def test_markdown_of_each_suite():
    runs = {name: [run([1, 2], 1.0, 2)] for name in lb.GENERATE_SYSTEMS}
    record = {"prompts": 1, "max_new_tokens": 2, "rounds": 1, "lookup_tokens": 10,
              "results": [{"type": "Q4_1", "threads": 1, **lb.summarize_generation(runs)}]}
    assert "| Q4_1 | 1 | 2.0 | 2.0 | 2.0 | 2.0 | 1.00x |" in lb.smollm2_markdown(record)
    row = lb.summarize_decode("/x/f.gguf", 1e6, 2, {"ms_per_token": 10.0, "load_s": 1.0, "peak_rss_gb": 0.5,
                                                    "system": "ours"},
                              {"ms_per_token": 20.0, "load_s": 0.5, "peak_rss_gb": 0.4, "system": "llama.cpp"})
    assert "| f.gguf | 1 | 2 | 10.0 | 20.0 | 2.00x |" in lb.decode_markdown({"tokens": 65, "rounds": 1, "rows": [row]})


@pytest.mark.slow
@pytest.mark.skipif(not LLAMACPP_PYTHON.is_file(),
                    reason=f"{LLAMACPP_PYTHON} is absent: `make llamacpp-venv` installs llama-cpp-python 0.3.36 there")
def test_each_suite_end_to_end(tmp_path):
    common = ["--threads", "1", "--rounds", "1", "--out", str(tmp_path)]
    assert lb.run(parse("--suite", "smollm2", "--prompts", "2", "--max-new-tokens", "16", "--types", "Q8_0",
                        *common)) == 0
    smollm2 = json.loads((tmp_path / "llamacpp_smollm2.json").read_text())
    assert smollm2["files"]["Q8_0"] == str(cache_dir() / "llamacpp" / "SmolLM2-135M-Instruct.Q8_0.gguf")
    assert Path(smollm2["files"]["Q8_0"]).is_file()  # made once, kept for later runs
    assert [r["type"] for r in smollm2["results"]] == ["Q8_0"]
    for res in smollm2["results"]:
        assert res["prompts"] == 2
        assert res["identical"]["ours lookahead / ours plain"] == 2  # lossless
        assert all(0 <= n <= 2 for n in res["identical"].values())
        for name, s in res["systems"].items():
            assert 0 < s["tokens"] <= 2 * 16, name
            assert 1.0 <= s["tokens_per_step"] <= 11, name
    assert (tmp_path / "llamacpp_smollm2.md").read_text().count("| Q8_0 | 1 |") == 1

    assert lb.run(parse("--suite", "quality", "--text-tokens", "64", *common)) == 0
    quality = json.loads((tmp_path / "llamacpp_quality.json").read_text())
    (res,) = quality["results"]
    assert res["tokens"] == 64 and len(res["pairs"]) == len(lb.QUALITY_PAIRS)
    for pair in res["pairs"]:
        assert 0.5 <= pair["top1_agreement"] <= 1.0  # the same weights: most argmaxes agree
        assert 0 < pair["mean_abs_diff"] <= pair["max_abs_diff"] < res["max_abs_logit"]

    gguf = smollm2["files"]["Q8_0"]
    assert lb.run(parse("--suite", "decode", "--gguf", gguf, "--tokens", "9", *common)) == 0
    (row,) = json.loads((tmp_path / "llamacpp_decode.json").read_text())["rows"]
    for system in ("ours", "llamacpp"):
        assert row[system]["ms_per_token"] > 0 and row[system]["peak_rss_gb"] > 0
    for suite in lb.SUITES:
        assert (tmp_path / f"llamacpp_{suite}.md").is_file()
