"""The exact verify step end to end (LookaheadConfig.exact, model.set_exact): the logits of a verify step over a
random draft tree equal, bit for bit, the logits of the one-token steps that decode each node after its
root-to-node path was accepted. Random-weight tiny Llamas, the Triton kernels (the interpreter on CPU)."""

import pytest
import torch

from lookahead import LookaheadConfig
from tests.kernels.conftest import DEVICES
from tests.helpers import make_tiny_llama, random_tree_mask

pytestmark = pytest.mark.kernels


def tree(T: int, seed: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """A random tree of T nodes, parents before children: (tree mask [1, T, T], parents, depths [1, T])."""
    mask = random_tree_mask(1, T, torch.Generator().manual_seed(seed))
    parents = [-1] + [int(mask[0, i, :i].nonzero().max()) for i in range(1, T)]  # the deepest proper ancestor
    return mask, parents, mask[0].sum(-1)[None] - 1


def dfs_order(parents: list[int]) -> list[int]:
    children = {i: [] for i in range(len(parents))}
    for i, p in enumerate(parents[1:], 1):
        children[p].append(i)
    order, stack = [], [0]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(children[node]))
    return order


def verify_and_one_token_logits(model, prefix: int, T: int, seed: int):
    """(verify logits [T, V], one-token logits [T, V]) over a cache whose first `prefix` slots hold random K/V."""
    device = model.device
    g = torch.Generator().manual_seed(seed)
    mask, parents, depths = tree(T, seed)
    tokens = torch.randint(0, model.config.vocab_size, (1, T), generator=g).to(device)
    cache = model.kv_cache(1, prefix + T + 3)
    cache.buffer.copy_(torch.randn(cache.buffer.shape, generator=g))
    committed = cache.buffer.clone()
    cache.lens.fill_(prefix)
    with torch.no_grad():
        tree_logits = model.verify(tokens, depths.to(device), cache, mask.to(device))[0]  # (T, V)
        cache.buffer.copy_(committed)
        one = torch.empty_like(tree_logits)
        # in DFS order the slots prefix .. prefix + depth - 1 hold the node's ancestors, written by their own steps
        for i in dfs_order(parents):
            cache.lens.fill_(prefix + int(depths[0, i]))
            one[i] = model.verify(tokens[:, i:i + 1], torch.zeros(1, 1, dtype=torch.long, device=device), cache,
                                  None)[0, 0]
    return tree_logits, one


# (prefix, T, kv heads, CPU dtype): GQA 4 (4 query heads on 1 kv head) and 1 (4 on 4)
CASES = [(0, 16, 1, torch.float32), (37, 16, 4, torch.float16), (300, 7, 1, torch.float16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix, T, kv_heads, cpu_dtype", CASES)
def test_verify_logits_equal_one_token_steps_bitwise(device, prefix, T, kv_heads, cpu_dtype):
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device == "cuda" else [cpu_dtype]
    for dtype in dtypes:
        model = make_tiny_llama(prefix + T, num_key_value_heads=kv_heads).to(device=device, dtype=dtype)
        assert model.set_exact(True) is False and model.exact
        tree_logits, one = verify_and_one_token_logits(model, prefix, T, seed=T)
        assert torch.equal(tree_logits, one), (dtype, (tree_logits != one).any(-1).sum().item())


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix, T, kv_heads, dtype", [(300, 64, 1, torch.float32), (4096, 8, 1, torch.float16)])
def test_verify_logits_equal_one_token_steps_bitwise_big(device, prefix, T, kv_heads, dtype):
    model = make_tiny_llama(1, num_key_value_heads=kv_heads, max_position_embeddings=8192).to(device=device,
                                                                                          dtype=dtype)
    model.set_exact(True)
    tree_logits, one = verify_and_one_token_logits(model, prefix, T, seed=3)
    assert torch.equal(tree_logits, one)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_off_goes_back_to_the_default_kernels(device):
    model = make_tiny_llama(0).to(device)
    assert model.set_exact(True) is False
    assert model.set_exact(False) is True and not model.exact
    assert not any(getattr(m, "exact", False) for m in model.modules())
    with pytest.raises(ValueError, match="set_exact takes a bool"):
        model.set_exact("yes")


def test_cpu_torch_path_ignores_exact(monkeypatch):
    # fp32 on CPU runs the oneDNN linear and the torch references, exact already: set_exact changes nothing
    monkeypatch.setenv("LOOKAHEAD_KERNELS", "")
    ids = torch.randint(0, 48, (1, 9), generator=torch.Generator().manual_seed(2))
    model = make_tiny_llama(0)
    before = model(ids).logits
    model.set_exact(True)
    assert torch.equal(model(ids).logits, before)


def test_config_field():
    assert LookaheadConfig().exact is False and LookaheadConfig(exact=True).exact is True
    with pytest.raises(ValueError, match="exact must be a bool"):
        LookaheadConfig(exact="auto")


@pytest.mark.slow
def test_generate_fp16_lookahead_equals_plain_through_the_engine():
    # the whole path on CPU: the engine's plain and verify steps (buckets, padding nodes, compaction) with the
    # exact kernels in the interpreter, fp16; the second lookahead call drafts this very output (deep trees).
    # Small on purpose: the interpreter costs ~0.1 s per program (a node of a kv head of a layer)
    model = make_tiny_llama(5, num_key_value_heads=1).half()
    ids = torch.randint(0, 48, (1, 9), generator=torch.Generator().manual_seed(4))
    model.set_exact(True)
    plain = model.generate(ids, max_new_tokens=12, lookahead=False, eos_token_id=[])
    cfg = LookaheadConfig(adaptive=False, decoding_length=4, exact=True)
    for _ in range(2):
        out = model.generate(ids, max_new_tokens=12, lookahead=cfg, eos_token_id=[], return_dict_in_generate=True)
        assert out.sequences.tolist() == plain.tolist()
    assert out.stats.accepted_per_step > 1.5  # the trees really were verified
