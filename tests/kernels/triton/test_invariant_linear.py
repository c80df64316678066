import pytest
import torch
import torch.nn.functional as F

from lookahead import kernels
from tests.kernels.conftest import DEVICES, dtypes_for

pytestmark = pytest.mark.kernels

# (N, K): odd sizes that leave partial tiles on both axes, an exact multiple, a K shorter than one K tile
SHAPES = [(100, 200), (64, 256), (33, 17)]


def operands(N, K, M, device, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    cast = dict(device=device, dtype=dtype)
    x = torch.randn(M, K, generator=g).to(**cast)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(**cast)
    b = torch.randn(N, generator=g).to(**cast) if bias else None
    return x, w, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N, K", SHAPES)
def test_a_row_does_not_depend_on_m_or_the_other_rows(device, N, K):
    for dtype, _, _ in dtypes_for(device):
        x, w, b = operands(N, K, 130, device, dtype)
        full = kernels.invariant_linear(x, w, b)  # (130, N): M past one 128-row decode batch
        for M in (1, 8, 16, 64, 128):
            assert torch.equal(kernels.invariant_linear(x[:M], w, b), full[:M]), (dtype, M)
        # the same row among other rows: row 5 of x at row 0 of a 3-row batch and alone
        others = torch.randn(3, K, generator=torch.Generator().manual_seed(1)).to(x)
        others[0] = x[5]
        assert torch.equal(kernels.invariant_linear(others, w, b)[0], full[5])
        assert torch.equal(kernels.invariant_linear(x[5], w, b), full[5])  # 1-D input: [K] -> [N]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N, K", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch(device, N, K, bias):
    for dtype, atol, rtol in dtypes_for(device):
        x, w, b = operands(N, K, 37, device, dtype, bias)
        ref = F.linear(x.cpu().float(), w.cpu().float(), None if b is None else b.cpu().float())
        torch.testing.assert_close(kernels.invariant_linear(x, w, b).cpu().float(), ref, atol=atol * 4, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_and_strided_inputs(device):
    x, w, b = operands(40, 48, 12, device, torch.float32)
    x3 = x.view(2, 6, 48)
    out = kernels.invariant_linear(x3, w, b)
    assert out.shape == (2, 6, 40)
    assert torch.equal(out.view(12, 40), kernels.invariant_linear(x, w, b))
    strided = torch.zeros(12, 96, device=device)[:, ::2]  # elements 2 apart
    strided.copy_(x)
    assert torch.equal(kernels.invariant_linear(strided, w, b), kernels.invariant_linear(x, w, b))
    assert kernels.invariant_linear(x[:0], w, b).shape == (0, 40)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [(16, 64, 128, 4, 4), (32, 32, 64, 4, 3), (64, 128, 64, 4, 3)])
def test_other_tiles_are_invariant_too(device, config):
    # tile_config's wide-N tile (BLOCK_N 64, N >= 16384) and the GPU sweep's candidates, on a small weight
    from lookahead.kernels.triton.invariant_linear import launch

    x, w, b = operands(150, 70, 80, device, torch.float32)
    full = launch(x, w, b, config)
    torch.testing.assert_close(full.cpu(), F.linear(x.cpu(), w.cpu(), b.cpu()), atol=1e-4, rtol=1e-5)
    for M in (1, 16, 33):
        assert torch.equal(launch(x[:M], w, b, config), full[:M])


def test_torch_path_off_triton(monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_KERNELS", "torch")
    x, w, b = operands(10, 12, 3, "cpu", torch.float32)
    assert torch.equal(kernels.invariant_linear(x, w, b), F.linear(x, w, b))


def test_misuse_raises_value_error():
    x, w, b = operands(10, 12, 3, "cpu", torch.float32)
    with pytest.raises(ValueError, match="same K"):
        kernels.invariant_linear(x[:, :5], w, b)
    with pytest.raises(ValueError, match="same K"):
        kernels.invariant_linear(x, w[0], b)
    with pytest.raises(ValueError, match="share one of the dtypes"):
        kernels.invariant_linear(x.half(), w, b)
    with pytest.raises(ValueError, match="share one of the dtypes"):
        kernels.invariant_linear(x.double(), w.double(), b.double())
    with pytest.raises(ValueError, match="bias must be"):
        kernels.invariant_linear(x, w, b[:4])
    with pytest.raises(ValueError, match="bias must be"):
        kernels.invariant_linear(x, w, b.half())
    with pytest.raises(ValueError, match="must be tensors"):
        kernels.invariant_linear(x.tolist(), w, b)
    with pytest.raises(ValueError, match="different devices"):
        kernels.invariant_linear(x, w.to("meta"), None)
