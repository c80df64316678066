"""The C++ tail of a CPU step (kernels/cpu/accept.cpp): argmax, top_k_indices, accept_longest_path and compact_kv
give the torch references' results (reference.py and kernels/ops.py define them) on random trees, targets, caches
and logits, through the op registry."""

import pytest
import torch

from lookahead.kernels import cpu as cpu_ops
from lookahead.kernels import reference

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="the C++ CPU ops could not be built here")


def random_trees(B: int, T: int, vocab: int, g: torch.Generator):
    """B trees of T nodes (parents[i] < i, some rows padded with parent -1 nodes), and targets that make long
    correct paths likely (a node's target is often one of its children's tokens)."""
    parents = torch.full((B, T), -1, dtype=torch.long)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    for b in range(B):
        size = int(torch.randint(1, T + 1, (1,), generator=g))  # nodes past `size` are padding
        for i in range(1, size):
            p = int(torch.randint(max(0, i - 3), i, (1,), generator=g))
            parents[b, i] = p
            if torch.rand(1, generator=g) < 0.6:
                targets[b, p] = tokens[b, i]
    return tokens, parents, targets


@pytest.mark.parametrize("T", [1, 2, 7, 16, 64])
def test_accept_longest_path_matches_the_reference(T):
    g = torch.Generator().manual_seed(T)
    for vocab in (3, 50):  # a tiny vocabulary makes ties between equally deep branches
        tokens, parents, targets = random_trees(5, T, vocab, g)
        path, num = torch.ops.lookahead.accept_longest_path(tokens, parents, targets)
        ref_path, ref_num = reference.accept_longest_path(tokens, parents, targets)
        assert torch.equal(path, ref_path) and torch.equal(num, ref_num)
        assert int(num.max()) <= T and int(num.min()) >= 1


def test_accept_longest_path_rejects_bad_input():
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.lookahead_cpu.accept_longest_path(tokens, tokens.int(), tokens)
    with pytest.raises(RuntimeError, match=r"\[B, T\]"):
        torch.ops.lookahead_cpu.accept_longest_path(tokens, tokens[:, :3], tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [7, 33, 64])
def test_compact_kv_matches_the_reference(dtype, T):
    g = torch.Generator().manual_seed(T)
    B, S = 4, 200
    tokens, parents, targets = random_trees(B, T, 3, g)
    path, num = reference.accept_longest_path(tokens, parents, targets)
    full = torch.randn(2, 2, B + 2, 3, S, 16, generator=g).to(dtype)  # [L, 2, B, Hkv, S, D]
    cache = full[:, :, 1:B + 1]  # a row range, as KVCache.rows makes: not contiguous
    lens = torch.randint(0, S - T, (B,), generator=g)
    expected = full.clone()
    reference.compact_kv(expected[:, :, 1:B + 1], lens, path, num)
    torch.ops.lookahead.compact_kv(cache, lens, path, num)
    assert torch.equal(full, expected)  # rows outside the range untouched too
    j = torch.arange(T)
    assert bool(((path != j) & (j < num[:, None])).any())  # some accepted node moved to a lower slot


def test_compact_kv_rejects_a_path_beyond_the_cache():
    cache = torch.zeros(1, 2, 1, 1, 8, 4)
    with pytest.raises(RuntimeError, match="within the cache"):
        torch.ops.lookahead_cpu.compact_kv(cache, torch.tensor([6]), torch.tensor([[0, 3]]), torch.tensor([2]))


def test_argmax_matches_torch():
    """The greedy targets' argmax (accept.cpp, registered for the registry's CPU key) == torch.argmax, here on the
    host's own build; test_isa_paths runs the same check on every code path."""
    from tests.kernels.cpu.test_isa_paths import check_argmax

    check_argmax()
    logits = torch.randn(2, 3, 50).to(torch.bfloat16)
    assert torch.equal(torch.ops.lookahead.argmax(logits), logits.float().argmax(-1))  # [..., V] -> [...]


def test_argmax_rejects_an_empty_vocabulary():
    with pytest.raises(RuntimeError, match="V > 0"):
        torch.ops.lookahead.argmax(torch.zeros(2, 0))


def test_top_k_indices_matches_a_stable_descending_sort():
    """The recycled predictions' top-k (accept.cpp) == the torch reference (a stable descending sort): the k largest,
    largest first, equal values by index; bf16 rows full of ties, -0.0 against 0.0, infinities and NaNs (above every
    number, as torch.topk has them), k from 0 to V, rows around the 8-wide loop. test_isa_paths runs it on every
    code path."""
    from tests.kernels.cpu.test_isa_paths import check_top_k

    check_top_k()


def test_top_k_indices_rejects_k_beyond_the_row():
    with pytest.raises(RuntimeError, match="0 <= k <= V"):
        torch.ops.lookahead.top_k_indices(torch.zeros(2, 5), 6)
