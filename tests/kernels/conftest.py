import pytest
import torch

# The Triton kernels run where the tests run: on CPU through the interpreter, else compiled for the GPU.
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


def dtypes_for(device: str):
    """(dtype, atol, rtol): bf16 only on CUDA, since the interpreter computes bf16 on raw bits."""
    out = [(torch.float32, 2e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
    if device == "cuda":
        out.append((torch.bfloat16, 2e-2, 2e-2))
    return out


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    """Kernel tests call the Triton path explicitly; on CPU it runs in the interpreter (tests/conftest.py)."""
    monkeypatch.setenv("LOOKAHEAD_KERNELS", "triton")
    monkeypatch.setenv("LOOKAHEAD_CHECKS", "1")  # value checks on CUDA too (they sync; generation skips them)
