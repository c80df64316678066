import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before anything imports triton
# (importing torch does not); with one they are compiled for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tests.helpers import make_ours_from_hf, make_tiny_llama  # noqa: E402 - after TRITON_INTERPRET is chosen

# The other hosts' code paths the kernel tests build the C++ ops for (LOOKAHEAD_CPU_ARCH), in the order they need them
OTHER_ARCHS = ("x86-64-v3", "x86-64-v4", "x86-64-v2")
_builder: list[threading.Thread] = []


def _build(archs: list[str]) -> None:
    for arch in archs:
        subprocess.run(["nice", "-n", "19", sys.executable, "-c", "from lookahead.kernels import cpu; cpu.load()"],
                       env={**os.environ, "LOOKAHEAD_CPU_ARCH": arch}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)


# Work started at collection for later tests: name -> (the thread that starts it, its work directory, [what the
# thread started: a process, or why it could not])
BACKGROUND: dict[str, tuple[threading.Thread, Path, list]] = {}


def pytest_collection_finish(session):
    """Work that later tests need, started as soon as the tests are collected, at the lowest priority: it then runs
    on the core that the single-threaded tests (replay, the Triton interpreter) leave idle.
    - Where the collected tests build the C++ ops for other hosts' code paths (about 25 s each on 2 cores), those
      builds, one after another. A test that needs a build still in progress waits on its build directory's lock,
      then loads it.
    - Where tests/integrations/test_vllm.py is collected, its vLLM run (about 70 s of one core), once `make test`'s
      background install of the vLLM venv has ended; its fixture waits for it."""
    archs = {item.callspec.params.get("arch") for item in session.items if hasattr(item, "callspec")}
    wanted = [arch for arch in OTHER_ARCHS if arch in archs]
    if wanted and platform.machine() in ("x86_64", "AMD64") and shutil.which("nice") and not _builder:
        _builder.append(threading.Thread(target=_build, args=(wanted,), daemon=True))
        _builder[0].start()
    if any(item.nodeid.startswith("tests/integrations/test_vllm.py") for item in session.items) \
            and "vllm" not in BACKGROUND:
        from tests.integrations.test_vllm import VLLM_STAMP, start_when_installed, vllm_install_running

        if VLLM_STAMP.is_file() or vllm_install_running():
            work, started = Path(tempfile.mkdtemp(prefix="lookahead-vllm-")), []

            def start() -> None:
                try:
                    started.append(start_when_installed(work))
                except Exception as e:  # reported by the fixture that waits for it
                    started.append(f"starting vLLM's run failed: {e!r}")

            thread = threading.Thread(target=start, daemon=True)
            thread.start()
            BACKGROUND["vllm"] = (thread, work, started)


def pytest_sessionfinish(session, exitstatus):
    """Let a background build finish: one killed half-way would leave its build directory's lock behind. A
    background process still running (its tests deselected, or the session stopped early) is stopped, and its work
    directory removed."""
    for thread in _builder:
        thread.join(timeout=600)
    for thread, work, started in BACKGROUND.values():
        thread.join(timeout=1800)
        for job in started:
            if isinstance(job, subprocess.Popen):
                job.kill()
                job.wait()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(autouse=True)
def _drafting_gate_held_open(request, monkeypatch):
    """The engine's drafting gate turns drafting off where it measurably costs more per token than plain steps on
    this host (the wall clock of a shared CI machine). Tests check what drafting does, bits and accepted tokens, so
    the gate is off (LOOKAHEAD_DRAFT_GATE=0); tests marked `live_gate` see the real one."""
    if request.node.get_closest_marker("live_gate") is None:
        monkeypatch.setenv("LOOKAHEAD_DRAFT_GATE", "0")


@pytest.fixture
def tiny_llama():
    """Factory: tiny_llama(seed=0, **hf_config_overrides) -> a random-weight LlamaForLookahead (fp32, CPU;
    vocab `model.config.vocab_size`, 48 unless overridden)."""
    return make_tiny_llama


@pytest.fixture
def ours_from_hf():
    """Function: ours_from_hf(hf_model, cls=LlamaForLookahead) -> our model holding the transformers model's
    weights (for parity tests against transformers)."""
    return make_ours_from_hf


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct in fp32 on CPU, with its tokenizer (converted once per cache dir)."""
    from transformers import AutoTokenizer

    from lookahead.models import LlamaForLookahead, resolve_checkpoint

    model = LlamaForLookahead.from_pretrained("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"))
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2_half():
    """({torch.bfloat16: model, torch.float16: model}, tokenizer): the embedded SmolLM2 in bf16 and fp16 on CPU (the
    C++ CPU ops make both exact; skipped where they cannot be built)."""
    from transformers import AutoTokenizer

    from lookahead.kernels import cpu as cpu_ops
    from lookahead.models import LlamaForLookahead, resolve_checkpoint

    if not cpu_ops.available():
        pytest.skip("the C++ CPU ops could not be built here: half precision is not exact without them")
    models = {dt: LlamaForLookahead.from_pretrained("smollm2-135m-instruct", dtype=dt, device="cpu")
              for dt in (torch.bfloat16, torch.float16)}
    return models, AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"))
