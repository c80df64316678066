"""Draft trees: hier and par layouts, budgets, buckets, the packed batch and its ancestor mask."""

import pytest
import torch

from lookahead.drafting.tree import TREE_BUCKETS, DraftTree, bucket_size, build_draft, pack_ragged

# retrieved nodes (root excluded), DFS pre-order: 2 -> (3 -> (7, 8), 4)
TOKENS, PARENTS = [2, 3, 7, 8, 4], [0, 1, 2, 2, 1]


def test_hier_keeps_the_trie_shape():
    tree = build_draft(1, TOKENS, PARENTS, layout="hier")
    assert tree.tokens == [1, 2, 3, 7, 8, 4]
    assert tree.parents == [-1, 0, 1, 2, 2, 1]
    assert tree.depths == [0, 1, 2, 3, 3, 2]
    assert tree.num_draft == 5


def test_par_lays_each_branch_out_as_its_own_chain():
    tree = build_draft(1, TOKENS, PARENTS, layout="par")
    # leaves 7, 8, 4: chains 2 3 7 | 2 3 8 | 2 4, each hanging off the root
    assert tree.tokens == [1, 2, 3, 7, 2, 3, 8, 2, 4]
    assert tree.parents == [-1, 0, 1, 2, 0, 4, 5, 0, 7]
    assert tree.depths == [0, 1, 2, 3, 1, 2, 3, 1, 2]


def test_budget_cuts_a_pre_order_prefix_that_is_still_a_tree():
    tree = build_draft(1, TOKENS, PARENTS, layout="par", budget=4)
    assert tree.tokens == [1, 2, 3, 7, 2] and tree.parents == [-1, 0, 1, 2, 0]


def test_buckets():
    assert [bucket_size(n) for n in (1, 5, 16, 17, 128)] == [1, 6, 16, 24, 128]
    assert TREE_BUCKETS[-1] == 128
    with pytest.raises(ValueError, match="at most 128"):
        bucket_size(129)


def test_pack_pads_rows_to_one_bucket_with_the_ancestor_mask():
    a = build_draft(1, TOKENS, PARENTS)
    b = build_draft(5, [], [])
    batch = pack_ragged([[], []], [a, b], "cpu", pad=True).tree
    assert batch.tokens.shape == (2, 6)
    assert batch.tokens[0].tolist() == [1, 2, 3, 7, 8, 4] and batch.tokens[1, 0] == 5
    assert batch.parents[1].tolist() == [-1] * 6  # padding nodes have no parent: never accepted
    mask = batch.tree_mask[0]
    assert mask[3].tolist() == [True, True, True, True, False, False]  # 7 sees root, 2, 3, itself
    assert mask[5].tolist() == [True, True, False, False, False, True]  # 4 sees root, 2, itself
    assert torch.equal(batch.tree_mask[1], torch.eye(6, dtype=torch.bool))  # padding sees only itself
    assert pack_ragged([[]], [build_draft(1, [2] * 6, list(range(6)))], "cpu", pad=True).tree.tokens.shape == (1, 8)


def test_bad_trees_raise_value_error():
    with pytest.raises(ValueError, match="layout"):
        build_draft(1, TOKENS, PARENTS, layout="wide")
    with pytest.raises(ValueError, match="parent"):
        build_draft(1, [2, 3], [0, 2])
    with pytest.raises(ValueError, match="tokens but"):
        build_draft(1, [2, 3], [0])


def test_the_ancestor_mask_of_random_trees_equals_walking_up_each_node():
    import random

    rng = random.Random(0)
    for n_rows in (1, 3, 16):
        drafts = []
        for _ in range(n_rows):
            n = rng.choice([0, 1, 2, 7, 40, 127])  # draft nodes; the chains of long ones reach depth ~n
            parents = [rng.randrange(i) if rng.random() < 0.3 else i - 1 for i in range(1, n + 1)]
            drafts.append(build_draft(0, list(range(1, n + 1)), parents))
        batch = pack_ragged([[]] * n_rows, drafts, "cpu", pad=True).tree
        T = batch.tokens.shape[1]
        expected = torch.eye(T, dtype=torch.bool).repeat(n_rows, 1, 1)
        for b, d in enumerate(drafts):
            for i in range(len(d.tokens)):
                j = i
                while j >= 0:
                    expected[b, i, j] = True
                    j = d.parents[j]
        assert torch.equal(batch.tree_mask, expected)


def test_a_ragged_batch_flattens_every_rows_chain_and_tree_without_padding():
    tree = build_draft(1, TOKENS, PARENTS)  # 6 nodes
    root = DraftTree([9], [-1], [0])
    batch = pack_ragged([[], [5, 6], [7, 8, 9], []], [tree, root, None, None], "cpu")
    assert batch.num_tokens == 6 + 3 + 3 and batch.num_logits == 7 and not batch.uniform
    assert batch.tokens.tolist() == [1, 2, 3, 7, 8, 4, 5, 6, 9, 7, 8, 9]
    assert batch.rows.tolist() == [0] * 6 + [1] * 3 + [2] * 3
    assert batch.nodes.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2]
    assert batch.depths.tolist() == [0, 1, 2, 3, 3, 2, 0, 1, 2, 0, 1, 2]
    assert batch.shift.tolist() == [0, 2, 3, 0] and batch.has_tree.tolist() == [1, 1, 0, 0]
    assert batch.logit_index.tolist() == [0, 1, 2, 3, 4, 5, 8]  # every tree node, and the chunk's last token
    assert batch.mask.shape == (12, 6)
    assert batch.mask[3].tolist() == [True, True, True, True, False, False]  # 7 sees 1, 2, 3 and itself
    assert batch.mask[8].tolist() == [True, True, True, False, False, False]  # the root under a chunk sees it all
    assert batch.mask[10].tolist() == [True, True, False, False, False, False]  # a chain is causal
    assert batch.tree.tokens.shape == (4, 6) and batch.tree.parents[1].tolist() == [-1] * 6
    assert batch.tree_index[1, 0] == 6 and batch.tree_index[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_a_padded_ragged_batch_pads_every_tree_to_one_bucket_and_free_rows_to_a_padding_root():
    tree = build_draft(1, TOKENS, PARENTS)
    batch = pack_ragged([[], []], [tree, None], "cpu", pad=True)
    assert batch.uniform and batch.num_tokens == 2 * 6 and batch.tree.tokens.shape == (2, 6)
    assert batch.has_tree.tolist() == [1, 1] and batch.shift.tolist() == [0, 0]
    assert batch.tree.parents[1].tolist() == [-1] * 6  # the free row: a padding root, never accepted past it
    assert torch.equal(batch.tree.tree_mask[1], torch.eye(6, dtype=torch.bool))
    ragged = pack_ragged([[], []], [tree, None], "cpu")
    assert torch.equal(batch.tree.tree_mask[0], ragged.tree.tree_mask[0])  # the same tree, the same mask
    assert not pack_ragged([[], [3]], [tree, None], "cpu", pad=True).uniform  # a chain is never padded


def test_rows_that_verify_their_root_alone_get_the_general_packing_s_batch():
    """Every plain step's batch (each row its root alone, no chains) comes from `_pack_roots`: field for field the
    general packing's, values, dtypes and shapes, for one to three rows; and it is not shared between calls'
    tokens."""
    from dataclasses import fields

    from lookahead.drafting.tree import _pack

    for B in (1, 2, 3):
        trees = [DraftTree([40 + b], [-1], [0]) for b in range(B)]
        fast, general = pack_ragged([[]] * B, trees, "cpu"), _pack([[]] * B, trees, "cpu", False)
        for f in fields(fast):
            a, b = getattr(fast, f.name), getattr(general, f.name)
            for x, y in ([(getattr(a, g.name), getattr(b, g.name)) for g in fields(a)] if f.name == "tree" else
                         [(a, b)]):
                if isinstance(x, torch.Tensor):
                    assert x.dtype == y.dtype and torch.equal(x, y), (B, f.name)
                else:
                    assert x == y, (B, f.name)
    again = pack_ragged([[]], [DraftTree([7], [-1], [0])], "cpu")
    assert again.tokens.tolist() == [7] and fast.tokens.tolist() == [40, 41, 42]


def test_one_row_s_tree_gets_the_general_packing_s_batch():
    """A decode step of batch 1 (one row's tree, no chain) comes from `_pack_tree`: field for field the general
    packing's, values, dtypes and shapes, for random trees of 2 to 40 nodes (and a tree whose parents come after
    their children, which goes to the general packing)."""
    import random
    from dataclasses import fields

    from lookahead.drafting.tree import _pack, _pack_tree

    rng = random.Random(3)
    trees = [DraftTree([5, 9, 9, 4], [-1, 2, 0, 1], [0, 2, 1, 3])]
    for T in (2, 3, 5, 8, 17, 40):
        parents = [-1] + [rng.randrange(i) for i in range(1, T)]
        depths = [0] * T
        for i in range(1, T):
            depths[i] = depths[parents[i]] + 1
        trees.append(DraftTree([rng.randrange(1000) for _ in range(T)], parents, depths))
    for tree in trees:
        fast, general = _pack_tree(tree, "cpu"), _pack([[]], [tree], "cpu", False)
        for f in fields(fast):
            a, b = getattr(fast, f.name), getattr(general, f.name)
            for x, y in ([(getattr(a, g.name), getattr(b, g.name)) for g in fields(a)] if f.name == "tree" else
                         [(a, b)]):
                if isinstance(x, torch.Tensor):
                    assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), (tree, f.name)
                else:
                    assert x == y, (tree, f.name)
        assert pack_ragged([[]], [tree], "cpu").tokens.tolist() == tree.tokens
