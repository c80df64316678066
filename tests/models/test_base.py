"""The shared decoder (models/base.py): verify over branching draft trees equals full forwards of each
root-to-node path; oneDNN packing survives `.to()` / `.float()` and never runs on meta tensors."""

import pytest
import torch
import torch.nn.functional as F

from lookahead.models import LlamaForLookahead, base
from lookahead.models.base import Linear
from tests.models.test_llama import TINY, random_hf

# Two draft trees of 8 nodes (node 0 = the root, the last committed token; parents[i] < i).
# Row 0: the root has two children; the first has two children, one of which starts a chain 3 deep.
#   0 -> 1 -> 2 -> 3 -> 4,  1 -> 5,  0 -> 6 -> 7
# Row 1: three children of the root, the middle one branching again.
#   0 -> 1,  0 -> 2 -> 3,  2 -> 4 -> 5,  0 -> 6 -> 7
PARENTS = [[-1, 0, 1, 2, 3, 1, 0, 6], [-1, 0, 0, 2, 2, 4, 0, 6]]


def root_paths(parents: list[int]) -> list[list[int]]:
    """Node indices root .. i for every node i."""
    paths = []
    for i in range(len(parents)):
        path = [i]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        paths.append(path[::-1])
    return paths


@pytest.mark.parametrize("name", ["llama", "llama-head-dim"])
def test_verify_on_branching_trees_equals_full_forward_of_each_path(name, ours_from_hf):
    ours = ours_from_hf(random_hf(name)).pack_weights()
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


def packed_state(model) -> list[tuple[Linear, torch.Tensor | None]]:
    return [(m, m.packed) for m in model.modules() if isinstance(m, Linear)]


@pytest.mark.skipif(not base._MKLDNN_LINEAR, reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("name", ["llama", "llama-tied-mha"])
def test_dtype_and_device_moves_repack_the_linear_layers(name, monkeypatch, ours_from_hf):
    ours = ours_from_hf(random_hf(name)).pack_weights()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ours(ids).logits
    before = packed_state(ours)
    ours.to("cpu")  # nothing converted: the packed copies are kept, not rebuilt
    assert all(now is then for (_, now), (_, then) in zip(packed_state(ours), before))
    ours.double()
    assert all(p is None for _, p in packed_state(ours))
    moves = {".float()": lambda m: m.float(), ".to(torch.float32)": lambda m: m.double().to(torch.float32),
             '.to("cpu", torch.float32)': lambda m: m.double().to("cpu", torch.float32)}
    for move_name, move in moves.items():
        move(ours)
        for m, packed in packed_state(ours):
            assert packed is not None and m._packed_version == m.weight._version, move_name
        if ours.config.tie_word_embeddings:
            assert ours.output.weight is ours.tok_embeddings.weight
        with torch.no_grad(), monkeypatch.context() as patch:
            patch.setattr(F, "linear", lambda *a, **k: pytest.fail(f"after {move_name} a layer ran unpacked"))
            torch.testing.assert_close(ours(ids).logits, expected, msg=move_name)


def test_meta_models_are_never_packed():
    cfg = LlamaForLookahead.config_from_hf(random_hf("llama").config.to_dict())
    with torch.device("meta"):
        model = LlamaForLookahead(cfg)
    model.to(torch.float32).pack_weights()
    assert all(p is None for _, p in packed_state(model))
