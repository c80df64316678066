"""The shared decoder (models/causal_lm.py, models/layers.py): verify over branching draft trees equals full
forwards of each root-to-node path; the CPU path keeps one copy of each weight and follows `.to()` / `.float()`."""

import pytest
import torch

from lookahead.kernels import cpu as cpu_ops
from tests.helpers import TINY, random_hf, root_paths

# Two draft trees of 8 nodes (node 0 = the root, the last committed token; parents[i] < i).
# Row 0: the root has two children; the first has two children, one of which starts a chain 3 deep.
#   0 -> 1 -> 2 -> 3 -> 4,  1 -> 5,  0 -> 6 -> 7
# Row 1: three children of the root, the middle one branching again.
#   0 -> 1,  0 -> 2 -> 3,  2 -> 4 -> 5,  0 -> 6 -> 7
PARENTS = [[-1, 0, 1, 2, 3, 1, 0, 6], [-1, 0, 0, 2, 2, 4, 0, 6]]


@pytest.mark.parametrize("name", ["llama", "llama-head-dim"])
def test_verify_on_branching_trees_equals_full_forward_of_each_path(name, ours_from_hf):
    ours = ours_from_hf(random_hf(name))
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([6, 3])  # committed prefixes of unequal length (row 1 right-padded in the prefill)
    prompts = torch.randint(0, TINY["vocab_size"], (2, 6), generator=gen)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 8), generator=gen)
    paths = [root_paths(p) for p in PARENTS]
    depths = torch.tensor([[len(path) - 1 for path in row] for row in paths])  # (B, T)
    tree_mask = torch.zeros(2, 8, 8, dtype=torch.bool)  # node i sees its ancestors and itself
    for b, row in enumerate(paths):
        for i, path in enumerate(row):
            tree_mask[b, i, path] = True
    with torch.no_grad():
        cache = ours.kv_cache(2, 32)
        ours.prefill(prompts, lengths, cache)
        got = ours.verify(tokens, depths, cache, tree_mask)  # (B, T, V)
        for b in range(2):
            for i, path in enumerate(paths[b]):
                ids = torch.cat([prompts[b, :lengths[b]], tokens[b, path]])[None]
                torch.testing.assert_close(got[b, i], ours(ids).logits[0, -1], atol=1e-4, rtol=1e-4,
                                           msg=f"row {b}, node {i} (path {path})")
    assert cache.lens.tolist() == lengths.tolist()  # verify leaves the committed length to compaction


@pytest.mark.parametrize("name", ["llama", "llama-tied-mha"])
def test_dtype_moves_keep_one_copy_of_each_weight_and_new_rope_tables(name, ours_from_hf):
    ours = ours_from_hf(random_hf(name))
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ours(ids).logits
        for move_name, move in {".double().float()": lambda m: m.double().float(),
                                '.to("cpu", torch.float32)': lambda m: m.double().to("cpu", torch.float32),
                                # last: the bf16 round trip rounds the weights for good
                                ".to(torch.bfloat16).to(torch.float32)": lambda m: m.bfloat16().to(torch.float32)
                                }.items():
            move(ours)
            if ours.config.tie_word_embeddings:
                assert ours.output.weight is ours.tok_embeddings.weight, move_name
            tensors = list(ours.parameters()) + list(ours.buffers())
            assert not any(hasattr(m, "packed") for m in ours.modules()), "a layer keeps a second copy"
            assert ours.inv_freq.dtype == torch.float32
            got = ours(ids).logits
            assert got.dtype == torch.float32 and all(t.device.type == "cpu" for t in tensors)
            if "bfloat16" in move_name:
                torch.testing.assert_close(got, expected, atol=0.1, rtol=0.1, msg=move_name)
            else:
                assert torch.equal(got, expected), move_name


def test_cpu_path_equals_the_torch_path_within_rounding(ours_from_hf, monkeypatch):
    if not cpu_ops.available():
        pytest.skip("the C++ CPU ops could not be built here")
    ours = ours_from_hf(random_hf("llama"))
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fast = ours(ids).logits
        monkeypatch.setenv("LOOKAHEAD_KERNELS", "torch")  # the registry's torch references on the CPU
        plain = ours(ids).logits
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)


