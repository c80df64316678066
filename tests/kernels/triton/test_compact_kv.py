import pytest
import torch

from lookahead import kernels
from lookahead.kernels import reference
from tests.kernels.conftest import DEVICES, dtypes_for

pytestmark = pytest.mark.kernels


def make_cache(device, dtype, L=2, B=2, H=3, S=40, D=64):
    return torch.randn(L, 2, B, H, S, D, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [64, 128])
def test_overlapping_paths_match_the_reference(device, D):
    for dtype, _, _ in dtypes_for(device):
        cache = make_cache(device, dtype, D=D)
        lens = torch.tensor([5, 17], device=device)
        # row 0: 0, 2, 3 moves 2 -> 1 and 3 -> 2 (a source is another move's destination); row 1: 0, 1, 4, 6
        path = torch.tensor([[0, 2, 3, -1, -1, -1, -1], [0, 1, 4, 6, -1, -1, -1]], device=device)
        num = torch.tensor([3, 4], device=device)
        expected = cache.cpu().clone()
        reference.compact_kv(expected, lens.cpu(), path.cpu(), num.cpu())
        before = cache.cpu().clone()
        kernels.compact_kv(cache, lens, path, num)
        assert torch.equal(cache.cpu(), expected)
        # spelled out: slot 5 + 1 now holds old slot 5 + 2, slot 5 + 2 old 5 + 3, row 1 slot 19 old 21
        assert torch.equal(cache.cpu()[:, :, 0, :, 6], before[:, :, 0, :, 7])
        assert torch.equal(cache.cpu()[:, :, 0, :, 7], before[:, :, 0, :, 8])
        assert torch.equal(cache.cpu()[:, :, 1, :, 19], before[:, :, 1, :, 21])
        assert torch.equal(cache.cpu()[:, :, 1, :, 20], before[:, :, 1, :, 23])
        untouched = torch.ones(40, dtype=torch.bool)
        untouched[6:8] = False
        assert torch.equal(cache.cpu()[:, :, 0, :, untouched], before[:, :, 0, :, untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 7, 16, 64])
def test_random_paths_match_the_reference_and_rerun_bitwise(device, T):
    g = torch.Generator().manual_seed(T)
    B, S = 3, 300
    cache = make_cache(device, torch.float32, B=B, S=S)
    lens = torch.randint(0, S - T, (B,), generator=g)
    num = torch.randint(1, T + 1, (B,), generator=g)
    path = torch.full((B, T), -1, dtype=torch.long)
    for b in range(B):
        nodes = torch.sort(torch.randperm(T - 1, generator=g)[: num[b] - 1] + 1).values if T > 1 else torch.tensor([])
        path[b, : num[b]] = torch.cat([torch.tensor([0]), nodes.long()])
    expected = cache.cpu().clone()
    reference.compact_kv(expected, lens, path, num)
    again = cache.clone()
    kernels.compact_kv(cache, lens.to(device), path.to(device), num.to(device))
    kernels.compact_kv(again, lens.to(device), path.to(device), num.to(device))
    assert torch.equal(cache.cpu(), expected) and torch.equal(again, cache)


def test_reference_gathers_before_it_scatters():
    cache = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 1, 10, 1).repeat(1, 2, 1, 1, 1, 1).contiguous()
    reference.compact_kv(cache, torch.tensor([0]), torch.tensor([[0, 2, 3, 4]]), torch.tensor([4]))
    assert cache[0, 0, 0, 0, :5, 0].tolist() == [0, 2, 3, 4, 4]


def test_misuse_raises_value_error():
    cache = torch.zeros(1, 2, 1, 1, 8, 4)
    ok = dict(cache_lens=torch.tensor([2]), path=torch.tensor([[0, 1]]), num_accepted=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\[L, 2, B, Hkv, S, D\]"):
        kernels.compact_kv(cache[0], **ok)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.compact_kv(cache.transpose(4, 5), **ok)
    with pytest.raises(ValueError, match="int64"):
        kernels.compact_kv(cache, **{**ok, "path": ok["path"].int()})
    with pytest.raises(ValueError, match="num_accepted must be"):
        kernels.compact_kv(cache, **{**ok, "num_accepted": torch.tensor([0])})
    with pytest.raises(ValueError, match="past the cache"):
        kernels.compact_kv(cache, **{**ok, "cache_lens": torch.tensor([7])})
    with pytest.raises(ValueError, match="rows"):
        kernels.compact_kv(cache, **{**ok, "cache_lens": torch.tensor([1, 2])})


@pytest.mark.parametrize("device", DEVICES)
def test_a_row_range_view_moves_only_its_rows(device):
    L, B, H, S, D = 2, 5, 2, 12, 8
    full = torch.randn(L, 2, B, H, S, D, generator=torch.Generator().manual_seed(0)).to(device)
    expected = full.clone()
    lens, path, num = torch.tensor([3, 1]), torch.tensor([[0, 2, 3, -1], [0, 1, 3, 4]]), torch.tensor([3, 4])
    for b, row in enumerate((1, 2)):  # the view's rows 0 and 1 are the buffer's rows 1 and 2
        for j in range(int(num[b])):
            expected[:, :, row, :, int(lens[b]) + j] = full[:, :, row, :, int(lens[b]) + int(path[b, j])]
    kernels.compact_kv(full[:, :, 1:3], lens.to(device), path.to(device), num.to(device))
    assert torch.equal(full.cpu(), expected.cpu())  # rows 0, 3 and 4 untouched
