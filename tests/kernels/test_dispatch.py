import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lookahead.kernels import dispatch

pytestmark = pytest.mark.kernels

CUDA_TENSOR = SimpleNamespace(is_cuda=True)  # all backend() and check_values() read of a tensor


@pytest.mark.parametrize("has_triton, forced, cuda, expected", [
    (True, "", True, "triton"), (True, "", False, "torch"), (False, "", True, "torch"), (False, "", False, "torch"),
    (True, "torch", True, "torch"), (False, "torch", True, "torch"), (True, "triton", False, "triton")])
def test_backend_choice(monkeypatch, has_triton, forced, cuda, expected):
    monkeypatch.setattr(dispatch, "HAS_TRITON", has_triton)
    monkeypatch.setenv("LOOKAHEAD_KERNELS", forced)
    assert dispatch.backend(CUDA_TENSOR if cuda else torch.zeros(1)) == expected


def test_forced_triton_without_triton_or_a_bad_value_raise(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    monkeypatch.setenv("LOOKAHEAD_KERNELS", "triton")
    with pytest.raises(ValueError, match="needs the triton package"):
        dispatch.backend(CUDA_TENSOR)
    monkeypatch.setenv("LOOKAHEAD_KERNELS", "cuda")
    with pytest.raises(ValueError, match="'torch' or 'triton'"):
        dispatch.backend(torch.zeros(1))


def test_value_checks_step_aside_during_graph_capture(monkeypatch):
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setenv("LOOKAHEAD_CHECKS", "1")
    assert dispatch.check_values(CUDA_TENSOR) and dispatch.check_values(torch.zeros(1))
    capturing[0] = True  # a sync inside a capture would fail it
    assert not dispatch.check_values(CUDA_TENSOR)
    monkeypatch.setenv("LOOKAHEAD_CHECKS", "")
    capturing[0] = False
    assert not dispatch.check_values(CUDA_TENSOR) and dispatch.check_values(torch.zeros(1))


def test_ops_import_and_run_without_triton():
    # a fresh interpreter where `import triton` fails, as on macOS and Windows
    script = """
import os
import sys
sys.modules["triton"] = None
import torch
from lookahead import kernels
from lookahead.kernels import reference
assert not kernels.HAS_TRITON
q, k = torch.randn(1, 3, 2, 80), torch.randn(1, 1, 9, 80)
lens, mask = torch.tensor([4]), torch.ones(1, 3, 3, dtype=torch.bool).tril()
assert kernels.ancestor_bits(mask) is None
assert torch.equal(kernels.tree_attention(q, k, k, lens, mask), reference.tree_attention(q, k, k, lens, mask))
path, num = kernels.accept_longest_path(torch.tensor([[5, 6]]), torch.tensor([[-1, 0]]), torch.tensor([[6, 1]]))
assert path.tolist() == [[0, 1]] and num.tolist() == [2]
cache = torch.arange(8.0).view(1, 2, 1, 1, 4, 1).contiguous()
kernels.compact_kv(cache, torch.tensor([0]), torch.tensor([[0, 2]]), torch.tensor([2]))
assert cache[0, 0, 0, 0, :, 0].tolist() == [0.0, 2.0, 2.0, 3.0]
assert kernels.gumbel_noise(1, torch.tensor([0]), torch.tensor([[3]]), 10).shape == (1, 1, 10)
os.environ["LOOKAHEAD_KERNELS"] = "triton"
try:
    kernels.compact_kv(cache, torch.tensor([0]), torch.tensor([[0, 2]]), torch.tensor([2]))
except ValueError as e:
    assert "needs the triton package" in str(e)
else:
    raise AssertionError("LOOKAHEAD_KERNELS=triton without triton must raise")
"""
    env = {k: v for k, v in os.environ.items() if k != "LOOKAHEAD_KERNELS"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
