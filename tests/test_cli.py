"""`lookahead generate` and `lookahead chat` on the embedded SmolLM2 through cli.main, and flag errors."""

import io
import re
import sys

import pytest

from lookahead.cli import main
from lookahead.drafting.trie import TokenTrie

MODEL = ["--model", "smollm2-135m-instruct"]
PROMPT = ["--chat", "--prompt", "Name three fruits."]


@pytest.fixture
def loaded(smollm2, monkeypatch):
    """cli commands get the session's SmolLM2 (on a fresh trie, restored afterwards) instead of loading it,
    and every generate call's keyword arguments and output are recorded in `calls`."""
    model, tokenizer = smollm2
    monkeypatch.setattr(model, "trie", TokenTrie())
    calls = []
    generate = model.generate

    def spy(ids, **kwargs):
        out = generate(ids, **kwargs)
        calls.append((ids, kwargs, out))
        return out

    monkeypatch.setattr(model, "generate", spy)
    monkeypatch.setattr("lookahead.models.auto.load_model", lambda *args: (model, tokenizer))
    return model, tokenizer, calls


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_seeded_sampling_repeats_with_lookahead_on_or_off(loaded, capsys):
    _, _, calls = loaded
    flags = ["--max-new-tokens", "12", "--do-sample", "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9",
             "--seed", "7"]
    first = run(capsys, "generate", *MODEL, *PROMPT, *flags)
    again = run(capsys, "generate", *MODEL, *PROMPT, *flags)
    plain = run(capsys, "generate", *MODEL, *PROMPT, *flags, "--no-lookahead")
    assert first[0] == 0 and first[1].strip()
    assert first[1] == again[1] == plain[1]
    assert calls[0][1]["lookahead"] is True and calls[2][1]["lookahead"] is False
    assert {k: calls[0][1][k] for k in ("do_sample", "temperature", "top_k", "top_p", "seed")} == \
        dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=7)


def test_greedy_no_lookahead_equals_lookahead(capsys):
    """Loads the model the way a user's command does (no fixture)."""
    look = run(capsys, "generate", *MODEL, *PROMPT, "--max-new-tokens", "16")
    plain = run(capsys, "generate", *MODEL, *PROMPT, "--max-new-tokens", "16", "--no-lookahead")
    assert look[0] == plain[0] == 0
    assert look[1].strip() and look[1] == plain[1]
    summary = r"^\[\d+ tokens, [\d.]+ tokens/s, [\d.]+ accepted/step, prefill [\d.]+s\]$"
    assert re.match(summary, look[2].strip()) and re.match(summary, plain[2].strip())
    assert "1.00 accepted/step" in plain[2]


@pytest.mark.parametrize("flags, message", [
    (["--do-sample", "--temperature", "0"], "temperature must be > 0"),
    (["--do-sample", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["--top-p", "0.5", "--seed", "3"], "--top-p, --seed only apply with --do-sample"),
])
def test_bad_sampling_flags_exit_2_with_the_reason(loaded, capsys, flags, message):
    code, out, err = run(capsys, "generate", *MODEL, *PROMPT, "--max-new-tokens", "4", *flags)
    assert code == 2 and out == ""
    assert err.startswith("lookahead: error: ") and message in err
    assert not loaded[2]  # nothing was generated


def test_bad_dtype_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", *MODEL, *PROMPT, "--dtype", "fp64"])
    assert e.value.code == 2 and "invalid choice: 'fp64'" in capsys.readouterr().err


def test_stop_strings_end_the_output(loaded, capsys):
    _, full, _ = run(capsys, "generate", *MODEL, *PROMPT, "--max-new-tokens", "24")
    stop = full.split()[2]  # a word from early in the greedy reply
    code, out, _ = run(capsys, "generate", *MODEL, *PROMPT, "--max-new-tokens", "24", "--stop", stop,
                       "--stop", "never in the output")
    assert code == 0
    assert loaded[2][-1][1]["stop_strings"] == [stop, "never in the output"]
    assert stop in out and len(out.strip()) < len(full.strip()) and full.startswith(out.strip())


def test_chat_keeps_the_history_and_reports_each_turn(loaded, capsys, monkeypatch):
    _, tokenizer, calls = loaded
    stdin = io.StringIO("What is the capital of France?\nSay that again.\n/reset\n\nName a colour.\n/quit\nunread\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, err = run(capsys, "chat", *MODEL, "--max-new-tokens", "10")
    assert code == 0
    assert len(calls) == 3  # /quit ended the session before "unread"
    prompts = [tokenizer.decode(ids[0]) for ids, _, _ in calls]
    replies = [tokenizer.decode(o.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
               for ids, _, o in calls]
    assert all(r and r in out for r in replies)  # streamed to stdout
    assert "capital of France" in prompts[1] and replies[0] in prompts[1] and "Say that again." in prompts[1]
    assert "France" not in prompts[2] and "Name a colour." in prompts[2]  # /reset cleared the history
    summaries = [line for line in err.splitlines() if "accepted/step" in line]
    assert len(summaries) == 3 and all("tokens/s" in s for s in summaries)
    assert "[history cleared]" in err and "> " not in out  # no prompt when stdin is not a terminal


def test_chat_ends_at_end_of_input(loaded, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi.\n"))
    code, out, err = run(capsys, "chat", *MODEL, "--max-new-tokens", "4")
    assert code == 0 and len(loaded[2]) == 1 and err.count("accepted/step") == 1
