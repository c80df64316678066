import pytest

from lookahead import LookaheadConfig


@pytest.mark.parametrize("kwargs, match", [
    ({"decoding_length": -1}, "decoding_length"),
    ({"decoding_length": 128}, "decoding_length"),
    ({"decoding_length": 2.5}, "decoding_length must be an int"),
    ({"branch_length": 1}, "branch_length"),
    ({"max_query_length": 0}, "max_query_length"),
    ({"max_query_length": 2.0}, "max_query_length"),
    ({"recycle_top_k": -1}, "recycle_top_k"),
    ({"layout": "tree"}, "layout"),
    ({"adaptive": "yes"}, "adaptive"),
    ({"max_trie_nodes": 3}, "max_trie_nodes"),
])
def test_invalid_values_are_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LookaheadConfig(**kwargs)


def test_defaults_are_valid():
    cfg = LookaheadConfig()
    assert cfg.layout == "hier" and cfg.adaptive and 0 < cfg.decoding_length <= 127


def test_for_trie_takes_the_tries_window_and_bound_and_nothing_else():
    from lookahead import TokenTrie

    cfg = LookaheadConfig.for_trie(TokenTrie(branch_length=6, max_trie_nodes=500), decoding_length=8)
    assert (cfg.branch_length, cfg.max_trie_nodes, cfg.decoding_length) == (6, 500, 8)
    assert cfg.max_query_length == LookaheadConfig().max_query_length
    with pytest.raises(ValueError, match="TokenTrie"):
        LookaheadConfig.for_trie({"branch_length": 6})
    with pytest.raises(ValueError, match="decoding_length"):
        LookaheadConfig.for_trie(TokenTrie(), decoding_length=-1)
