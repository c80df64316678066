import itertools

import pytest
import torch
import torch.nn.functional as F

from lookahead import kernels
from lookahead.kernels import reference
from tests.kernels.conftest import DEVICES, dtypes_for
from tests.helpers import random_tree_mask

pytestmark = pytest.mark.kernels

PREFIXES, TS, GROUPS, HEAD_DIMS = (0, 1, 37, 300), (1, 7, 16, 64), (1, 3), (64, 128)
# every value of every axis, in pairwise combinations (the interpreter runs programs one by one in numpy)
CASES = [(p, t, g, d) for p, t, g, d in itertools.product(PREFIXES, TS, GROUPS, HEAD_DIMS)
         if (PREFIXES.index(p) + TS.index(t) + GROUPS.index(g) + HEAD_DIMS.index(d)) % 3 == 0]


def inputs(prefix, T, group, D, device, dtype, B=2, Hkv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([prefix, max(0, prefix - 5)][:B])
    S = prefix + T + 3
    q = torch.randn(B, T, Hkv * group, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    mask = random_tree_mask(B, T, g)
    cast = dict(device=device, dtype=dtype)
    return q.to(**cast), k.to(**cast), v.to(**cast), lens.to(device), mask.to(device)


def test_cases_cover_every_listed_value():
    for axis, values in enumerate((PREFIXES, TS, GROUPS, HEAD_DIMS)):
        assert {c[axis] for c in CASES} == set(values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix, T, group, D", CASES)
def test_matches_reference(device, prefix, T, group, D):
    for dtype, atol, rtol in dtypes_for(device):
        q, k, v, lens, mask = inputs(prefix, T, group, D, device, dtype)
        out = kernels.tree_attention(q, k, v, lens, mask)
        ref = reference.tree_attention(*(x.cpu().float() for x in (q, k, v)), lens.cpu(), mask.cpu())
        torch.testing.assert_close(out.cpu().float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix, T", [(0, 7), (37, 16), (300, 64)])
def test_chain_tree_equals_causal_attention(device, prefix, T):
    q, k, v, lens, _ = inputs(prefix, T, 3, 64, device, torch.float32, B=1)
    chain = torch.ones(1, T, T, dtype=torch.bool, device=device).tril()
    n = prefix + T
    # causal attention of the T new queries over prefix + themselves
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k[:, :, :n].repeat_interleave(3, 1), v[:, :, :n].repeat_interleave(3, 1),
        attn_mask=torch.ones(T, n, dtype=torch.bool, device=device).tril(prefix)).transpose(1, 2)
    for tree_mask in (chain, None):
        torch.testing.assert_close(kernels.tree_attention(q, k, v, lens, tree_mask), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_reruns_are_bitwise_equal(device):
    q, k, v, lens, mask = inputs(37, 16, 3, 64, device, torch.float32)
    assert torch.equal(kernels.tree_attention(q, k, v, lens, mask), kernels.tree_attention(q, k, v, lens, mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix, T, group, D, splits", [(300, 7, 3, 64, 3), (37, 16, 1, 128, 2), (1, 64, 1, 64, 4)])
def test_prefix_splits_match_reference(device, prefix, T, group, D, splits):
    from lookahead.kernels.triton.tree_attention import launch

    for dtype, atol, rtol in dtypes_for(device):
        q, k, v, lens, mask = inputs(prefix, T, group, D, device, dtype)
        out = launch(q, k, v, lens, mask, num_splits=splits)
        ref = reference.tree_attention(*(x.cpu().float() for x in (q, k, v)), lens.cpu(), mask.cpu())
        torch.testing.assert_close(out.cpu().float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_ancestor_bits_packed_once_give_the_same_result(device):
    # the model packs the mask once per step and passes the bits to every layer
    q, k, v, lens, mask = inputs(37, 70, 1, 64, device, torch.float32)
    bits = kernels.ancestor_bits(mask)
    assert bits is not None and bits.shape == (2, 70, 2)
    out = kernels.tree_attention(q, k, v, lens, mask, ancestor_bits=bits)
    assert torch.equal(out, kernels.tree_attention(q, k, v, lens, mask))
    with pytest.raises(ValueError, match="ancestor_bits must be"):
        kernels.tree_attention(q, k, v, lens, mask, ancestor_bits=bits[:, :5])


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    q, k, v, lens, mask = inputs(37, 7, 3, 64, device, torch.float32)
    lens_col = torch.stack([lens, lens], 1)[:, 0]  # stride 2
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, Hq, D) with heads outermost
    out = kernels.tree_attention(q_strided, k, v, lens_col, mask)
    ref = reference.tree_attention(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), mask.cpu())
    torch.testing.assert_close(out.cpu(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix, T, group, D", [(37, 7, 3, 80), (1, 16, 1, 96), (300, 4, 2, 100), (5, 3, 1, 8)])
def test_head_dims_padded_to_a_power_of_two(device, prefix, T, group, D):
    # common head dims the tile is not a power of two for (80, 96, 100) run in a 128 block masked to d < D
    for dtype, atol, rtol in dtypes_for(device):
        q, k, v, lens, mask = inputs(prefix, T, group, D, device, dtype, Hkv=1)
        ref = reference.tree_attention(*(x.cpu().float() for x in (q, k, v)), lens.cpu(), mask.cpu())
        out = kernels.tree_attention(q, k, v, lens, mask)
        assert out.shape == q.shape
        torch.testing.assert_close(out.cpu().float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_head_dim_with_prefix_splits(device):
    from lookahead.kernels.triton.tree_attention import launch

    q, k, v, lens, mask = inputs(300, 7, 3, 96, device, torch.float32, Hkv=1)
    ref = reference.tree_attention(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), mask.cpu())
    torch.testing.assert_close(launch(q, k, v, lens, mask, num_splits=3).cpu(), ref, atol=2e-5, rtol=1e-5)


def test_ancestor_bits_are_validated():
    q, k, v, lens, mask = inputs(5, 70, 1, 64, "cpu", torch.float32, B=1)
    bits = kernels.ancestor_bits(mask)
    assert bits.shape == (1, 70, 2)
    short = bits[:, :, :1]  # one word where node 69 needs two: the kernel would read past it
    strided = torch.zeros(1, 70, 4, dtype=torch.int64)[:, :, ::2]  # words 16 bytes apart
    strided.copy_(bits)
    for bad in (short, strided, bits.int(), bits[:, :69], torch.cat([bits, bits])):
        with pytest.raises(ValueError, match="ancestor_bits must be int64 \\[B, T, ceil\\(T / 64\\)\\]"):
            kernels.tree_attention(q, k, v, lens, mask, ancestor_bits=bad)
    with pytest.raises(ValueError, match="different devices"):
        kernels.tree_attention(q, k, v, lens, mask, ancestor_bits=bits.to("meta"))
    # a single word needs no stride between words
    q, k, v, lens, mask = inputs(5, 7, 1, 64, "cpu", torch.float32, B=1)
    one_word = torch.zeros(1, 7, 3, dtype=torch.int64)[:, :, 1:2]
    one_word.copy_(kernels.ancestor_bits(mask))
    torch.testing.assert_close(kernels.tree_attention(q, k, v, lens, mask, ancestor_bits=one_word),
                               kernels.tree_attention(q, k, v, lens, mask), atol=0, rtol=0)


def test_ancestor_bits_pack_the_mask():
    from lookahead.kernels.triton.tree_attention import build_ancestor_bits

    mask = random_tree_mask(2, 100, torch.Generator().manual_seed(1))
    bits = build_ancestor_bits(mask)
    assert bits.shape == (2, 100, 2)
    unpacked = ((bits[..., None] >> torch.arange(64)) & 1).bool().flatten(-2)[..., :100]
    assert torch.equal(unpacked, mask)


def test_misuse_raises_value_error():
    q, k, v, lens, mask = inputs(5, 4, 1, 64, "cpu", torch.float32)
    with pytest.raises(ValueError, match="q \\[B, T, Hq, D\\]"):
        kernels.tree_attention(q[0], k, v, lens, mask)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        kernels.tree_attention(q[:, :, :1].repeat(1, 1, 3, 1), k, v, lens, mask)
    with pytest.raises(ValueError, match="one float dtype"):
        kernels.tree_attention(q.half(), k, v, lens, mask)
    with pytest.raises(ValueError, match="int64"):
        kernels.tree_attention(q, k, v, lens.int(), mask)
    with pytest.raises(ValueError, match="tree_mask must be bool"):
        kernels.tree_attention(q, k, v, lens, mask.int())
    with pytest.raises(ValueError, match="must fit the cache"):
        kernels.tree_attention(q, k, v, lens + 10, mask)
    with pytest.raises(ValueError, match=">= 0"):
        kernels.tree_attention(q, k, v, lens - 10, mask)
    with pytest.raises(ValueError, match="head dims up to 256"):
        q300, k300, v300, _, _ = inputs(5, 4, 1, 300, "cpu", torch.float32)
        kernels.tree_attention(q300, k300, v300, lens, mask)
    with pytest.raises(ValueError, match="at most 128"):
        big = torch.randn(1, 129, 1, 64)
        kernels.tree_attention(big, torch.randn(1, 1, 140, 64), torch.randn(1, 1, 140, 64), torch.tensor([0]), None)


@pytest.mark.parametrize("device", DEVICES)
def test_value_checks_on_the_device(device):
    # LOOKAHEAD_CHECKS=1 (set for the kernel tests) makes the checks that read values run on CUDA as well
    q, k, v, lens, mask = inputs(5, 4, 1, 64, device, torch.float32)
    with pytest.raises(ValueError, match="must fit the cache"):
        kernels.tree_attention(q, k, v, lens + k.shape[2], mask)
    parents = torch.tensor([[0, 0, 1, 1]], device=device)
    with pytest.raises(ValueError, match="parents must"):
        kernels.accept_longest_path(parents, parents, parents)


# ---- EXACT mode (LookaheadConfig.exact): a node's output has the bits of the one-token step decoding it ----------

def one_token_steps(q, k, v, lens, mask, num_splits=None):
    """Each node's output from the one-token step that decodes it after its path was accepted: the cache compacted
    (the node's root-to-node path at slots lens[b] .. lens[b] + depth), T = 1, no tree mask. The B * T steps run
    as one batch of B * T rows: EXACT programs are per row, so this also checks that the batch changes nothing."""
    from lookahead.kernels.triton.tree_attention import launch

    B, T, Hq, D = q.shape
    k1 = k.repeat_interleave(T, 0)  # (B * T, Hkv, S, D): row b * T + i is node i's compacted cache
    v1 = v.repeat_interleave(T, 0)
    lens1 = torch.empty(B * T, dtype=torch.long)
    for b in range(B):
        P = int(lens[b])
        for i in range(T):
            path = mask[b, i].nonzero().flatten()  # ancestors by index = by depth (parents come first)
            r = b * T + i
            k1[r, :, P:P + len(path)], v1[r, :, P:P + len(path)] = k[b, :, P + path], v[b, :, P + path]
            lens1[r] = P + len(path) - 1
    out = launch(q.reshape(B * T, 1, Hq, D), k1, v1, lens1.to(q.device), None, num_splits=num_splits, exact=True)
    return out.view(B, T, Hq, D)


# (prefix, T, GQA group, rows, CPU dtype): the interpreter runs one program per (row, node, kv head) in numpy, so
# each case runs one dtype on CPU (fp32 and fp16 both covered); CUDA runs every dtype, bf16 included
EXACT_CASES = [(0, 7, 1, 2, torch.float32), (37, 16, 4, 2, torch.float16), (300, 64, 1, 1, torch.float16),
               (37, 64, 4, 1, torch.float32), (300, 1, 4, 2, torch.float32), (1, 100, 1, 1, torch.float16)]


def exact_dtypes(device, dtype):
    return dtypes_for(device) if device == "cuda" else [t for t in dtypes_for(device) if t[0] == dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix, T, group, B, cpu_dtype", EXACT_CASES)
def test_exact_nodes_equal_one_token_steps_bitwise(device, prefix, T, group, B, cpu_dtype):
    # the default kernel packs nodes into one tile and walks the draft after the prefix tiles: a node's sums run
    # in another order than in the one-token step (most nodes differ in the last bits); EXACT must not
    from lookahead.kernels.triton.tree_attention import launch

    for dtype, atol, rtol in exact_dtypes(device, cpu_dtype):
        q, k, v, lens, mask = inputs(prefix, T, group, 16, device, dtype, B=B, Hkv=1)
        out = launch(q, k, v, lens, mask, exact=True)
        assert torch.equal(out, one_token_steps(q, k, v, lens, mask))
        ref = reference.tree_attention(*(x.cpu().float() for x in (q, k, v)), lens.cpu(), mask.cpu())
        torch.testing.assert_close(out.cpu().float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix, T, group, D, splits, cpu_dtype", [(300, 16, 4, 16, 3, torch.float16),
                                                                    (37, 7, 1, 96, 2, torch.float32),
                                                                    (0, 5, 1, 16, 4, torch.float32)])
def test_exact_with_prefix_splits_and_padded_head_dim(device, prefix, T, group, D, splits, cpu_dtype):
    # splits are cut by each node's own key count, so a node and its one-token step split alike
    from lookahead.kernels.triton.tree_attention import launch

    for dtype, atol, rtol in exact_dtypes(device, cpu_dtype):
        q, k, v, lens, mask = inputs(prefix, T, group, D, device, dtype, B=1, Hkv=1)
        out = launch(q, k, v, lens, mask, num_splits=splits, exact=True)
        assert torch.equal(out, one_token_steps(q, k, v, lens, mask, num_splits=splits))
        ref = reference.tree_attention(*(x.cpu().float() for x in (q, k, v)), lens.cpu(), mask.cpu())
        torch.testing.assert_close(out.cpu().float(), ref, atol=atol, rtol=rtol)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T, group, dtype, splits", [(16, 4, torch.float16, None), (8, 1, torch.float32, 4)])
def test_exact_after_a_4k_prefix(device, T, group, dtype, splits):
    from lookahead.kernels.triton.tree_attention import launch

    q, k, v, lens, mask = inputs(4096, T, group, 16, device, dtype, B=1, Hkv=1)
    out = launch(q, k, v, lens, mask, num_splits=splits, exact=True)
    assert torch.equal(out, one_token_steps(q, k, v, lens, mask, num_splits=splits))


@pytest.mark.parametrize("device", DEVICES)
def test_exact_chain_equals_exact_tree_and_default_is_untouched(device):
    q, k, v, lens, _ = inputs(37, 16, 4, 16, device, torch.float32)
    chain = torch.ones(2, 16, 16, dtype=torch.bool, device=device).tril()
    exact = kernels.tree_attention(q, k, v, lens, None, exact=True)
    assert torch.equal(exact, kernels.tree_attention(q, k, v, lens, chain, exact=True))
    assert torch.equal(kernels.tree_attention(q, k, v, lens, chain, exact=False),
                       kernels.tree_attention(q, k, v, lens, chain))
    with pytest.raises(ValueError, match="exact must be a bool"):
        kernels.tree_attention(q, k, v, lens, chain, exact=1)
    with pytest.raises(ValueError, match="parents before children"):
        kernels.tree_attention(q, k, v, lens, chain.transpose(1, 2).contiguous(), exact=True)
