import pytest
import torch

from lookahead import kernels
from lookahead.kernels import reference
from tests.kernels.conftest import DEVICES

pytestmark = pytest.mark.kernels


def run(tokens, parents, targets, device):
    t = [torch.tensor(x, dtype=torch.long, device=device) for x in (tokens, parents, targets)]
    path, num = kernels.accept_longest_path(*t)
    ref_path, ref_num = reference.accept_longest_path(*[x.cpu() for x in t])
    assert torch.equal(path.cpu(), ref_path) and torch.equal(num.cpu(), ref_num)
    return path.tolist(), num.tolist()


# tree: 0 -> 1 -> 2 -> 3 (branch a), 0 -> 4 -> 5 (branch b), 1 -> 6 (sibling of 2)
TOKENS = [[9, 10, 11, 12, 20, 21, 13]]
PARENTS = [[-1, 0, 1, 2, 0, 4, 1]]


@pytest.mark.parametrize("device", DEVICES)
def test_no_match(device):
    path, num = run(TOKENS, PARENTS, [[99] * 7], device)
    assert num == [1] and path == [[0, -1, -1, -1, -1, -1, -1]]


@pytest.mark.parametrize("device", DEVICES)
def test_full_match_of_the_first_branch(device):
    # target after node i: root -> 10, 1 -> 11, 2 -> 12, 3 -> 77
    path, num = run(TOKENS, PARENTS, [[10, 11, 12, 77, 0, 0, 0]], device)
    assert num == [4] and path == [[0, 1, 2, 3, -1, -1, -1]]


@pytest.mark.parametrize("device", DEVICES)
def test_match_on_the_second_branch(device):
    path, num = run(TOKENS, PARENTS, [[20, 0, 0, 0, 21, 5, 0]], device)
    assert num == [3] and path == [[0, 4, 5, -1, -1, -1, -1]]


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_smallest_index(device):
    # node 2 (token 11) and node 6 (token 13) both children of 1; make both depth-2 nodes correct by
    # duplicating: target of 1 is 11, so only 2 matches; build a tree with two equal-depth correct nodes
    tokens = [[5, 6, 7, 6, 7]]
    parents = [[-1, 0, 1, 0, 3]]  # two identical branches 0-1-2 and 0-3-4
    path, num = run(tokens, parents, [[6, 7, 0, 7, 0]], device)
    assert num == [3] and path == [[0, 1, 2, -1, -1]]


@pytest.mark.parametrize("device", DEVICES)
def test_padding_nodes_are_never_accepted(device):
    tokens = [[5, 6, 0, 0]]
    parents = [[-1, 0, -1, -1]]
    path, num = run(tokens, parents, [[6, 0, 0, 0]], device)  # padding token 0 equals the target of node 1
    assert num == [2] and path == [[0, 1, -1, -1]]


@pytest.mark.parametrize("device", DEVICES)
def test_a_correct_child_of_a_wrong_parent_is_wrong(device):
    tokens = [[5, 6, 7]]
    parents = [[-1, 0, 1]]
    path, num = run(tokens, parents, [[99, 7, 0]], device)  # node 2 matches its parent's target, node 1 does not
    assert num == [1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 7, 16, 64, 128])
def test_random_trees_match_the_reference_and_rerun_bitwise(device, T):
    g = torch.Generator().manual_seed(T)
    B = 3
    parents = torch.full((B, T), -1, dtype=torch.long)
    for i in range(1, T):
        parents[:, i] = torch.randint(-1, i, (B,), generator=g).clamp(min=0)
    parents[:, 1:][torch.rand(B, T - 1, generator=g) < 0.1] = -1  # some padding
    tokens = torch.randint(0, 3, (B, T), generator=g)
    targets = torch.randint(0, 3, (B, T), generator=g)
    run(tokens.tolist(), parents.tolist(), targets.tolist(), device)
    args = [x.to(device) for x in (tokens, parents, targets)]
    first = kernels.accept_longest_path(*args)
    second = kernels.accept_longest_path(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_misuse_raises_value_error():
    t = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="int64"):
        kernels.accept_longest_path(t.int(), t, t)
    with pytest.raises(ValueError, match="share"):
        kernels.accept_longest_path(t, t[:, :3], t)
    with pytest.raises(ValueError, match="parents must"):
        kernels.accept_longest_path(t, torch.tensor([[-1, 0, 2, 1]]), t)
    with pytest.raises(ValueError, match="parents must"):
        kernels.accept_longest_path(t, torch.tensor([[0, 0, 1, 1]]), t)
    with pytest.raises(ValueError, match="at most 128"):
        big = torch.zeros(1, 129, dtype=torch.long)
        kernels.accept_longest_path(big, torch.cat([torch.tensor([[-1]]), torch.zeros(1, 128, dtype=torch.long)], 1),
                                    big)
