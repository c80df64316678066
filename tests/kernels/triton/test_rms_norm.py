import pytest
import torch

from lookahead import kernels
from lookahead.kernels.triton.rms_norm import reference
from tests.kernels.conftest import DEVICES, dtypes_for

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [32, 100, 576])
def test_matches_the_model_norm_and_rows_are_independent(device, D):
    from lookahead.models.layers import RMSNorm

    g = torch.Generator().manual_seed(D)
    for dtype, atol, rtol in dtypes_for(device):
        norm = RMSNorm(D, 1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
        norm = norm.to(device=device, dtype=dtype)
        x = (torch.randn(2, 40, D, generator=g) * 3).to(device=device, dtype=dtype)
        out = kernels.rms_norm(x, norm.weight, 1e-5)
        assert out.shape == x.shape and out.dtype == dtype
        torch.testing.assert_close(out.float(), norm(x).float(), atol=atol, rtol=rtol)
        flat = out.view(80, D)
        for M in (1, 7, 64):
            assert torch.equal(kernels.rms_norm(x.view(80, D)[:M], norm.weight, 1e-5), flat[:M])


def test_misuse_raises_value_error():
    x, w = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.rms_norm(x, w[:4], 1e-6)
    with pytest.raises(ValueError, match="one float dtype"):
        kernels.rms_norm(x, w.half(), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        kernels.rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="tensors"):
        kernels.rms_norm(x.tolist(), w, 1e-6)


def test_torch_path_is_the_reference(monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_KERNELS", "torch")
    x, w = torch.randn(3, 8), torch.rand(8)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), reference(x, w, 1e-6))
