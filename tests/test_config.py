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
