import pytest
import torch

from lookahead import kernels
from lookahead.kernels import reference
from tests.kernels.conftest import DEVICES

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7])
def test_kernel_noise_equals_the_torch_noise(device, seed):
    rows = torch.tensor([0, 3], device=device)
    positions = torch.tensor([[5, 6, 7], [100, 101, 2000]], device=device)
    got = kernels.gumbel_noise(seed, rows, positions, 1000)
    ref = reference.gumbel_noise(seed, rows.cpu(), positions.cpu(), 1000)
    assert got.shape == (2, 3, 1000)
    # same hash bits; the fp64 logs of two libraries may differ in the last place, which fp32 rounding hides
    mismatched = (got.cpu() != ref).sum().item()
    assert mismatched <= 2, mismatched
    assert torch.equal(got.cpu().argmax(-1), ref.argmax(-1))
    assert abs(ref.mean().item() - 0.5772) < 0.05  # Gumbel(0, 1) has mean = Euler-Mascheroni


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_and_positions(device):
    rows = torch.tensor([[2, 0], [5, 0]], device=device)[:, 0]  # stride 2
    positions = torch.tensor([[7, 8], [9, 10]], device=device).t()  # column-major
    got = kernels.gumbel_noise(3, rows, positions, 100)
    ref = reference.gumbel_noise(3, rows.cpu().contiguous(), positions.cpu().contiguous(), 100)
    assert (got.cpu() != ref).sum().item() <= 2


def test_misuse_raises_value_error():
    with pytest.raises(ValueError, match="int64"):
        kernels.gumbel_noise(0, torch.tensor([0]), torch.tensor([[1]], dtype=torch.int32), 10)
    with pytest.raises(ValueError, match="seed"):
        kernels.gumbel_noise(-1, torch.tensor([0]), torch.tensor([[1]]), 10)
    with pytest.raises(ValueError, match="rows"):
        kernels.gumbel_noise(0, torch.tensor([0, 1]), torch.tensor([[1]]), 10)
    with pytest.raises(ValueError, match="vocab"):
        kernels.gumbel_noise(0, torch.tensor([0]), torch.tensor([[1]]), 0)
    with pytest.raises(ValueError, match="different devices"):
        kernels.gumbel_noise(0, torch.tensor([0], device="meta"), torch.tensor([[1]]), 10)


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_seeds_give_each_row_its_own_seeds_noise(device):
    seeds = [7, 2**63 + 5, 0]  # the second one >= 2**63: stored as its two's-complement int64
    rows = torch.tensor([0, 0, 4], device=device)
    positions = torch.tensor([[3, 4], [3, 4], [9, 10]], device=device)
    as_int64 = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], device=device)
    got = kernels.gumbel_noise(as_int64, rows, positions, 300).cpu()
    for b, seed in enumerate(seeds):
        alone = reference.gumbel_noise(seed, rows[b:b + 1].cpu(), positions[b:b + 1].cpu(), 300)
        assert (got[b:b + 1] != alone).sum().item() <= 2
    assert not torch.equal(got[0], got[1])  # same row and positions, other seed
    with pytest.raises(ValueError, match="per-row seeds"):
        kernels.gumbel_noise(torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([[1], [2]]), 10)
