import pytest
import torch

from lookahead.sampling import gumbel_noise_torch
from tests.kernels.conftest import DEVICES

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7])
def test_kernel_noise_equals_the_torch_noise(device, seed):
    from lookahead.kernels.gumbel_noise import gumbel_noise

    rows = torch.tensor([0, 3], device=device)
    positions = torch.tensor([[5, 6, 7], [100, 101, 2000]], device=device)
    got = gumbel_noise(seed, rows, positions, 1000)
    ref = gumbel_noise_torch(seed, rows.cpu(), positions.cpu(), 1000)
    assert got.shape == (2, 3, 1000)
    # same hash bits; the fp64 logs of two libraries may differ in the last place, which fp32 rounding hides
    mismatched = (got.cpu() != ref).sum().item()
    assert mismatched <= 2, mismatched
    assert torch.equal(got.cpu().argmax(-1), ref.argmax(-1))
    assert abs(ref.mean().item() - 0.5772) < 0.05  # Gumbel(0, 1) has mean = Euler-Mascheroni


def test_misuse_raises_value_error():
    from lookahead.kernels.gumbel_noise import gumbel_noise

    with pytest.raises(ValueError, match="int64"):
        gumbel_noise(0, torch.tensor([0]), torch.tensor([[1]], dtype=torch.int32), 10)
    with pytest.raises(ValueError, match="seed"):
        gumbel_noise(-1, torch.tensor([0]), torch.tensor([[1]]), 10)
