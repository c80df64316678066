"""Drafter: probability scores on hand-built tries, the expected-gain size policy on synthetic cost curves,
recycled branches, and the request life of docs/API.md."""

import pytest

from lookahead import Drafter, LookaheadConfig, TokenTrie
from lookahead.drafting.drafter import Calibration
from tests.helpers import golden_trie

FLAT = {1: 1.0, 128: 1.0}  # verifying more nodes costs nothing (a GPU far from its limits)


def test_probability_is_the_product_of_smoothed_count_ratios():
    q, evidence, nodes = golden_trie().candidates([1], 8)
    # after 1 (3 windows): 2 (3 of them), then 3 (2 of 3) and 4 (1 of 3), then 7 and 8 (1 of 2 under 3 each);
    # each ratio is count / (parent count + 0.5)
    assert (q, evidence) == (1, 3)
    assert [(t, p) for t, p, _ in nodes] == [(2, -1), (3, 0), (4, 0), (7, 1), (8, 1)]
    p2 = 3 / 3.5
    expected = [p2, p2 * 2 / 3.5, p2 * 1 / 3.5, p2 * 2 / 3.5 * 1 / 2.5, p2 * 2 / 3.5 * 1 / 2.5]
    assert [prob for *_, prob in nodes] == pytest.approx(expected)


def test_the_longest_match_wins_and_local_and_global_sources_compete():
    trie = golden_trie()
    trie.insert([9, 2, 5])
    q, _, nodes = trie.candidates([9, 2], 8, max_query_length=3)
    assert q == 2 and [t for t, *_ in nodes] == [5]  # [9, 2] is known: only its own continuation
    q, _, nodes = trie.candidates([6, 2], 8, max_query_length=3)
    assert q == 1 and {t for t, *_ in nodes} >= {3, 4, 5}  # unknown [6, 2]: back off to [2]
    trie.begin_request(7, [1, 2, 4, 6], references=[[1, 2, 4, 6]])
    _, _, nodes = trie.candidates([1, 2], 8, request_id=7, max_query_length=2)
    assert nodes[0][0] == 4 and nodes[0][2] == pytest.approx(2 / 2.5)  # locally [1, 2] is always followed by 4
    assert nodes[1][0] == 6 and nodes[1][2] == pytest.approx(0.8 * 2 / 2.5)
    assert dict((t, p) for t, _, p in nodes)[3] == pytest.approx(2 / 3.5)  # the global source still offers 3


def test_a_running_requests_own_window_is_not_counted_as_evidence():
    trie = TokenTrie(branch_length=4, max_trie_nodes=1000)
    trie.insert([5, 6, 7])
    trie.begin_request(1, [5])
    trie.append(1, [6])  # the request's own [5, 6] has no continuation yet
    _, _, nodes = trie.candidates([5, 6], 4, request_id=1, max_query_length=2)
    assert nodes == [(7, -1, pytest.approx(1 / 1.5))]  # 1 of 1 earlier windows, not 1 of 2
    _, _, nodes = trie.candidates([5, 6], 4, max_query_length=2)  # a caller that is not the request: both count
    assert nodes == [(7, -1, pytest.approx(1 / 2.5))]


def forty_percent_drafter(cost_of_two: float) -> Drafter:
    trie = TokenTrie(branch_length=4, max_trie_nodes=1000)
    trie.insert([1, 2, 3])
    trie.insert([5, 1, 2])  # [1, 2] seen twice, followed by 3 once: p(3) = 1 / (2 + 0.5) = 0.4
    cfg = LookaheadConfig(branch_length=4, max_query_length=2, recycle_top_k=0)
    return Drafter(cfg, cost_curve={1: 1.0, 2: cost_of_two, 3: cost_of_two * 2}, trie=trie)


def test_a_forty_percent_node_is_drafted_only_when_its_gain_beats_its_cost():
    cheap = forty_percent_drafter(1.3)  # (1 + 0.4) / 1.3 > 1 / 1
    cheap.begin_request(0, [8, 1, 2])
    assert cheap.draft(0, [8, 1, 2]) == ([3], [0])
    dear = forty_percent_drafter(1.5)  # (1 + 0.4) / 1.5 < 1
    dear.begin_request(0, [8, 1, 2])
    assert dear.draft(0, [8, 1, 2]) == ([], [])


def test_drafts_that_are_never_accepted_turn_into_plain_steps():
    trie = TokenTrie(branch_length=6, max_trie_nodes=10_000)
    for _ in range(5):
        trie.insert([1, 2, 3, 4, 5])
    cfg = LookaheadConfig(branch_length=6, decoding_length=16, recycle_top_k=0)
    drafter = Drafter(cfg, cost_curve={1: 1.0, 8: 1.13, 16: 1.37, 32: 1.97, 64: 3.2}, trie=trie)
    drafter.begin_request(0, [9])
    sizes = []
    context = [9, 1, 2]
    for step in range(300):
        tokens, _ = drafter.draft(0, context)
        sizes.append(len(tokens))
        drafter.update(0, [40 + step % 7])  # the model never says 3
        trie.insert([1, 2, 3, 4, 5])  # ... although the trie keeps being told it would
    assert sizes[0] > 0
    assert sum(sizes[-100:]) == 0


def test_free_nodes_fill_the_whole_budget():
    trie = TokenTrie(branch_length=4, max_trie_nodes=100_000)
    for a in range(30):
        for b in range(3):
            trie.insert([1, 100 + a, 200 + b])
    cfg = LookaheadConfig(branch_length=4, decoding_length=63, recycle_top_k=0)
    drafter = Drafter(cfg, cost_curve=FLAT, trie=trie)
    drafter.begin_request(0, [7])
    tokens, parents = drafter.draft(0, [7, 1])
    assert len(tokens) == 63
    without_policy = Drafter(cfg, cost_curve=None, trie=trie)
    without_policy.begin_request(1, [7])
    assert len(without_policy.draft(1, [7, 1])[0]) == 63


def test_batches_price_every_row_on_the_curve():
    trie = TokenTrie(branch_length=4, max_trie_nodes=1000)
    trie.insert([1, 2, 3])
    trie.insert([5, 1, 2])  # p(3 | 1 2) = 0.4 for every row
    cfg = LookaheadConfig(branch_length=4, max_query_length=2, recycle_top_k=0)
    # one row: (1 + 0.4) / c(2) = 1.4 / 1.3 > 1; four rows: 4 * 1.4 / c(8) = 5.6 / 8 < 4 / c(4) = 4 / 4
    curve = {1: 1.0, 2: 1.3, 4: 1.0 * 4, 8: 8.0}
    drafter = Drafter(cfg, cost_curve=curve, trie=trie)
    for rid in range(4):
        drafter.begin_request(rid, [8])
    assert drafter.draft_batch([0], [[8, 1, 2]]) == [([3], [0])]
    assert drafter.draft_batch([0, 1, 2, 3], [[8, 1, 2]] * 4) == [([], [])] * 4


def test_recycled_tokens_fill_where_the_trie_has_nothing_and_merge_with_it():
    cfg = LookaheadConfig(branch_length=6, decoding_length=8)
    drafter = Drafter(cfg, cost_curve=None)
    drafter.begin_request(0, [1, 2])
    drafter.update(0, [3], predictions={3: [4, 5], 4: [6]})
    tokens, parents = drafter.draft(0, [1, 2, 3])  # the trie knows nothing after 3
    assert tokens[:2] == [4, 6] and parents[:2] == [0, 1] and 5 in tokens  # 3 -> 4 -> 6, and 3 -> 5
    drafter.trie.insert([3, 4, 7])
    tokens, parents = drafter.draft(0, [1, 2, 3])
    under_root = [t for t, p in zip(tokens, parents) if p == 0]
    assert sorted(under_root) == sorted(set(under_root)) and 4 in under_root  # 4 from both sources: one node
    four = tokens.index(4) + 1
    assert {t for t, p in zip(tokens, parents) if p == four} >= {6, 7}  # its children come from both


def test_calibration_learns_observed_acceptance():
    calib = Calibration()
    key = Calibration.key("trie", 2, 3, 0.5)
    for i in range(400):
        calib.observe(key, 0.5, accepted=i % 5 == 0)  # predicted 0.5, observed 0.2
    assert 0.2 * 0.9 < 0.5 * calib.ratio(key) < 0.2 * 1.1


def test_request_life_and_bad_use():
    drafter = Drafter(LookaheadConfig(branch_length=4))
    drafter.begin_request("a", [1, 2, 3])
    with pytest.raises(ValueError, match="already running"):
        drafter.begin_request("a", [1])
    with pytest.raises(ValueError, match="begin_request"):
        drafter.update("b", [1])
    drafter.update("a", [4])
    drafter.end_request("a")
    with pytest.raises(ValueError, match="branch_length is 4 but LookaheadConfig.branch_length is 8"):
        Drafter(LookaheadConfig(branch_length=8, max_query_length=6), trie=TokenTrie(branch_length=4))
    Drafter(LookaheadConfig(branch_length=4, max_trie_nodes=1 << 20), trie=TokenTrie(4, max_trie_nodes=64))
    assert Drafter(trie=TokenTrie(branch_length=5)).config.branch_length == 5  # no config: the trie's settings
    with pytest.raises(ValueError, match="TokenTrie"):
        Drafter(LookaheadConfig(), trie={})


def deepest_path(tokens: list[int], parents: list[int]) -> list[int]:
    """The tokens of the tree's longest root-to-node path (DFS pre-order, parents index the tree, 0 = root)."""
    depth, best = [0] * (len(tokens) + 1), 0
    for i, p in enumerate(parents, start=1):
        depth[i] = depth[p] + 1
        best = i if depth[i] > depth[best] else best
    path = []
    while best:
        path.append(tokens[best - 1])
        best = parents[best - 1]
    return path[::-1]


def test_a_long_copy_drafts_past_the_tries_window():
    doc = list(range(100, 160))  # a 60-token document in the prompt, which the output starts to copy
    cfg = LookaheadConfig(branch_length=4, max_query_length=3, decoding_length=63, recycle_top_k=0)
    drafter = Drafter(cfg, cost_curve=FLAT)
    drafter.begin_request(0, [1, 2] + doc + [3])
    drafter.update(0, doc[:12])
    tokens, parents = drafter.draft(0, [1, 2] + doc + [3] + doc[:12])
    path = deepest_path(tokens, parents)  # the copy runs on past the document, into what followed it
    assert len(path) == 63 and path[:49] == doc[12:] + [3]
    assert len(deepest_path(*drafter.trie.retrieve(doc[:12], 63, 0, 3))) == 1  # a 4-token window, 3 of them matched


def test_copies_come_from_references_and_merge_with_the_trie():
    ref = [7, 8, 9, 10, 11, 12, 13, 14]
    cfg = LookaheadConfig(branch_length=4, max_query_length=3, decoding_length=16, recycle_top_k=0)
    drafter = Drafter(cfg, cost_curve=None)
    drafter.begin_request(0, [5, 7, 8], references=[ref])
    tokens, parents = drafter.draft(0, [5, 7, 8])
    assert deepest_path(tokens, parents)[:6] == [9, 10, 11, 12, 13, 14]
    under_root = [t for t, p in zip(tokens, parents) if p == 0]
    assert under_root.count(9) == 1  # the trie (the reference's local windows) and the copy name 9: one node
    drafter.update(0, [9, 10, 99])  # the copy breaks at 99: nothing ever followed 99
    tokens, parents = drafter.draft(0, [5, 7, 8, 9, 10, 99])
    assert 11 not in tokens and all(t not in tokens for t in ref)


def test_copy_rates_learn_per_match_length_and_distance():
    calib = Calibration()
    prior = calib.copy_rate(40, 3)
    for _ in range(300):
        calib.observe_copy(40, 3, accepted=False)  # 33+ token matches, 3-4 tokens past the end: never accepted
    assert calib.copy_rate(40, 3) < 0.05 and calib.copy_rate(33, 4) == calib.copy_rate(40, 3)
    assert calib.copy_rate(40, 5) == prior and calib.copy_rate(20, 3) != calib.copy_rate(40, 3)


def test_negative_ids_are_refused_before_anything_changes():
    drafter = Drafter(LookaheadConfig(branch_length=4))
    with pytest.raises(ValueError, match=">= 0"):
        drafter.begin_request(0, [1, -2, 3])
    assert len(drafter.trie) == 0
    drafter.begin_request(0, [1, 2, 3])
    with pytest.raises(ValueError, match=">= 0"):
        drafter.update(0, [4, -1])
    drafter.update(0, [4])
    assert drafter._requests[0].suffix.text == [1, 2, 3, 4]


def test_the_step_price_is_one_interface_given_once():
    from lookahead.drafting.drafter import CostModel

    def trie():
        made = TokenTrie(branch_length=4, max_trie_nodes=1000)
        made.insert([1, 2, 3])
        return made

    cfg = LookaheadConfig(branch_length=4, max_query_length=2, recycle_top_k=0)
    by_curve = Drafter(cfg, cost_curve={1: 1.0, 2: 1.3, 3: 2.6}, trie=trie())
    by_price = Drafter(cfg, trie=trie(), step_cost=CostModel({1: 1.0, 2: 1.3, 3: 2.6}))
    for drafter in (by_curve, by_price):
        drafter.begin_request(0, [8, 1, 2])
    assert by_curve.draft(0, [8, 1, 2]) == by_price.draft(0, [8, 1, 2]) == ([3], [0])
    assert by_curve.token_cost(1) == by_price.token_cost(1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="not both"):
        Drafter(cfg, cost_curve={1: 1.0}, trie=trie(), step_cost=CostModel({1: 1.0}))
    with pytest.raises(ValueError, match="cost\\(rows, tokens\\)"):
        Drafter(cfg, trie=trie(), step_cost={1: 1.0})


def test_a_ragged_step_gives_nodes_to_the_rows_whose_drafts_pay():
    """One row whose context the trie knows well, three it does not: the well-known row keeps a long tree while
    the others verify their roots alone (no row pays for another's tree), and the modeled tokens per cost of the
    chosen step are never below a plain step's."""
    trie = TokenTrie(branch_length=16, max_trie_nodes=10_000)
    sequence = list(range(1, 30))
    for _ in range(4):
        trie.insert(sequence)
    cfg = LookaheadConfig(branch_length=16, decoding_length=32, recycle_top_k=0)
    curve = {1: 1.0, 2: 1.05, 4: 1.1, 8: 1.2, 16: 1.9, 32: 3.4, 64: 6.6, 256: 60.0}  # steeper past 64 tokens
    drafter = Drafter(cfg, cost_curve=curve, trie=trie)
    for rid in range(4):
        drafter.begin_request(rid, [100 + rid])
    contexts = [sequence[:3], [200, 201], [202, 203], [204, 205]]
    drafts = drafter.draft_batch(list(range(4)), contexts)
    sizes = [len(tokens) for tokens, _ in drafts]
    assert sizes[0] >= 4 and sizes[1:] == [0, 0, 0]
    # the same request in a step that also carries 200 prompt tokens: its nodes cost 3x more there
    crowded = drafter.draft_batch(list(range(4)), contexts, extra_tokens=200)
    assert len(crowded[0][0]) < sizes[0]


def test_the_ragged_policy_never_models_a_step_below_plain():
    import random

    from lookahead.drafting.drafter import _Node

    rng = random.Random(0)
    curve = {1: 1.0, 4: 1.3, 8: 2.0, 16: 4.5, 64: 20.0}
    drafter = Drafter(LookaheadConfig(recycle_top_k=0), cost_curve=curve)
    for _ in range(200):
        rows = rng.randint(1, 8)
        proposals = []
        for _ in range(rows):
            p, nodes = 1.0, []
            for i in range(rng.randint(0, 12)):
                p *= rng.uniform(0.3, 1.0)
                nodes.append(_Node(1, i - 1, p, None, p, i + 1))
            proposals.append(nodes)
        extra = rng.choice([0, 0, 16, 100])
        keep = drafter._choose_nodes(proposals, rows, rows, extra)
        kept = sorted((n.p for b, nodes in enumerate(proposals) for n in nodes[:keep[b]]), reverse=True)
        price = drafter.step_price
        plain, base = price(rows, rows), price(rows, rows + extra)
        score = (rows + sum(kept)) / (plain + price(rows, rows + extra + len(kept)) - base)
        assert score >= rows / plain - 1e-12
        everything = sorted((n.p for nodes in proposals for n in nodes), reverse=True)
        for k in range(len(everything) + 1):  # and no other number of most likely nodes models better
            other = (rows + sum(everything[:k])) / (plain + price(rows, rows + extra + k) - base)
            assert other <= score + 1e-12


def test_the_policy_reads_a_price_in_any_unit():
    """Only ratios of prices matter: a step price in seconds, in units of one verified token (vLLM's linear step,
    a plain step = 82.8) or relative gives the same drafts (the proposal's cut once compared scores with 1.0,
    which only a relative price's plain step scores, and cut a price in token units after the first bucket)."""
    from lookahead.drafting.drafter import CostModel

    class Scaled:
        def __init__(self, price, factor):
            self.price, self.factor = price, factor

        def cost(self, rows, tokens):
            return self.factor * self.price.cost(rows, tokens)

    trie = TokenTrie(branch_length=4, max_trie_nodes=100_000)
    for a in range(30):
        for b in range(3):
            trie.insert([1, 100 + a, 200 + b])
    cfg = LookaheadConfig(branch_length=4, decoding_length=63, recycle_top_k=0)
    drafts = []
    for rid, factor in enumerate((1.0, 82.8, 0.004)):
        drafter = Drafter(cfg, trie=trie, step_cost=Scaled(CostModel(FLAT), factor))
        drafter.begin_request(rid, [7])
        drafts.append(drafter.draft_batch([rid], [[7, 1]])[0])
    assert len(drafts[0][0]) == 63 and drafts[1] == drafts[0] and drafts[2] == drafts[0]


@pytest.mark.parametrize("layout", ["hier", "par"])
def test_draft_trees_are_draft_batchs_drafts_laid_out_in_the_configs_layout(layout):
    """What the engine asks (`draft_trees`) is `draft_batch`'s (tokens, parents) under each row's last token, built
    as any other proposer's are (`tree.trees_of_batch`); a row without a context gets no tree."""
    from lookahead.drafting.tree import trees_of_batch

    cfg = LookaheadConfig(branch_length=4, decoding_length=12, recycle_top_k=0, layout=layout)
    contexts = [[7, 1], None, [9, 1, 100]]
    made = []
    for build in ("trees", "batch"):
        drafter = Drafter(cfg, cost_curve=FLAT, trie=golden_trie())
        for rid, ctx in enumerate(contexts):
            drafter.begin_request(rid, ctx[:1] if ctx else [5])
        if build == "trees":
            made.append(drafter.draft_trees([0, 1, 2], contexts))
        else:
            made.append(trees_of_batch(drafter, layout, [0, 1, 2], contexts))
    trees, expected = made
    assert trees == expected and trees[1] is None
    assert [t.tokens[0] for t in (trees[0], trees[2])] == [1, 100]  # the root is the context's last token
    assert len(trees[0].tokens) > 1  # the golden trie drafts after token 1
