"""TokenTrie: golden retrieval trees, local-before-global ranking, streaming, the node bound, save/load."""

import json

import pytest

from lookahead.drafting.trie import TokenTrie
from tests.helpers import golden_trie


def test_golden_retrieval_tree():
    trie = golden_trie()
    # after token 1: 2 (3 windows), then 3 (2) before 4 (1), then 3's children 7 and 8; DFS pre-order
    assert trie.retrieve([1], 5) == ([2, 3, 7, 8, 4], [0, 1, 2, 2, 1])
    assert trie.retrieve([1], 3) == ([2, 3, 4], [0, 1, 1])  # best first: the budget keeps 2, 3, 4
    assert trie.retrieve([1], 1) == ([2], [0])
    assert trie.retrieve([1], 0) == ([], [])


def test_longest_query_first_then_shorter():
    trie = golden_trie()
    trie.insert([9, 3, 5])
    # the 2-token query [2, 3] matches and continues with 7 / 8; a 1-token query [3] would also offer 5
    tokens, _ = trie.retrieve([2, 3], 8, max_query_length=2)
    assert set(tokens) == {7, 8}
    tokens, _ = trie.retrieve([2, 3], 8, max_query_length=1)
    assert set(tokens) == {7, 8, 5}
    # [6, 3] is unknown: fall back to the suffix [3]
    tokens, _ = trie.retrieve([6, 3], 8, max_query_length=2)
    assert set(tokens) == {7, 8, 5}
    assert trie.retrieve([42], 8) == ([], [])


def test_request_local_counts_rank_first_and_leave_with_the_request():
    trie = golden_trie()
    trie.begin_request(7, [1, 2, 4, 6], references=[[1, 2, 4, 6]])
    tokens, parents = trie.retrieve([1, 2], 2, request_id=7, max_query_length=2)
    assert tokens == [4, 6] and parents == [0, 1]  # local 4 -> 6 beats the globally stronger 3
    assert trie.retrieve([1, 2], 1, max_query_length=2) == ([3], [0])  # other requests see global order
    trie.end_request(7)
    assert trie.retrieve([2, 4], 4, max_query_length=2) == ([], [])  # 6 only existed locally


def test_streamed_tokens_count_globally():
    trie = TokenTrie(branch_length=3, max_trie_nodes=1000)
    trie.begin_request(1, [5, 6])
    trie.append(1, [7])
    trie.append(1, [5, 6, 8])
    trie.end_request(1)
    # windows of 5 6 7 5 6 8: after [5, 6] come 7 and 8 (global, they stay after the request ends)
    tokens, parents = trie.retrieve([5, 6], 4, max_query_length=2)
    assert sorted(tokens) == [7, 8] and parents == [0, 0]


def test_node_bound_holds_across_10000_requests():
    trie = TokenTrie(branch_length=6, max_trie_nodes=2000)
    state = 12345
    for rid in range(10_000):
        seq = []
        for _ in range(12):
            state = (state * 1103515245 + 12345) % 2**31
            seq.append(state % 500)
        trie.begin_request(rid, seq[:4])
        trie.append(rid, seq[4:])
        trie.end_request(rid)
        assert len(trie) <= 2000
    assert len(trie) > 100  # it still holds recent text
    assert seq[6] in trie.retrieve(seq[4:6], 8, max_query_length=2)[0]  # the latest output is still drafted


def test_save_load_round_trip(tmp_path):
    trie = golden_trie()
    path = tmp_path / "trie.json"
    trie.save(path)
    loaded = TokenTrie.load(path)
    assert len(loaded) == len(trie) and loaded.branch_length == 4
    for context in ([1], [2], [2, 3], [1, 2]):
        assert loaded.retrieve(context, 8) == trie.retrieve(context, 8)


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": "something-else", "version": 1}), "not a saved TokenTrie"),
    (json.dumps({"format": "lookahead-token-trie", "version": 1, "branch_length": 4, "max_trie_nodes": 100,
                 "tokens": [1, 2], "parents": [-1, 5], "counts": [1, 1]}), "damaged"),
    (json.dumps({"format": "lookahead-token-trie", "version": 1, "branch_length": 4, "max_trie_nodes": 100,
                 "tokens": [1], "parents": [-1]}), "damaged"),
])
def test_corrupt_saved_file_raises_value_error(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        TokenTrie.load(path)
    with pytest.raises(FileNotFoundError):
        TokenTrie.load(tmp_path / "missing.json")


def test_bad_arguments():
    with pytest.raises(ValueError, match="branch_length"):
        TokenTrie(branch_length=1)
    trie = golden_trie()
    trie.begin_request(1, [1])
    with pytest.raises(ValueError, match="already running"):
        trie.begin_request(1, [2])
    with pytest.raises(ValueError, match="weight"):
        trie.insert([1, 2], weight=0)


def test_overflows_evict_gently_and_keep_recent_requests():
    """80 recorded SmolLM2 requests through a trie bounded at 20,000 nodes: each overflow evicts only down to
    90% of the bound (the old halving dropped it to 4,000-7,000), and the latest outputs are still drafted."""
    from lookahead.benchmarks.replay import SHIPPED, load_recording

    _, records = load_recording(SHIPPED)
    trie = TokenTrie(branch_length=12, max_trie_nodes=20_000)
    overflowed = False
    for rid, r in enumerate(records[:80]):
        trie.begin_request(rid, r["prompt_ids"])
        trie.append(rid, r["output_ids"])
        trie.end_request(rid)
        assert len(trie) <= 20_000
        overflowed = overflowed or len(trie) >= 18_000
        if overflowed:
            assert len(trie) >= 0.85 * 20_000
    assert overflowed
    for r in records[77:80]:  # the last requests' continuations are still there, as their most likely ones
        out = r["output_ids"]
        for i in range(4, min(60, len(out)), 7):
            _, _, nodes = trie.candidates(out[i - 4:i], 4, max_query_length=4)
            assert out[i] in [t for t, parent, _ in nodes if parent == -1]


def _lcg_tokens(state: int, n: int, vocab: int = 2000) -> list[int]:
    out = []
    for _ in range(n):
        state = (state * 1103515245 + 12345) % 2**31
        out.append(state % vocab)
    return out


def test_the_bound_covers_request_local_windows_of_many_long_concurrent_prompts():
    """Sixteen 1,500-token prompts at once over a full trie bounded at 20,000 nodes (each prompt alone would add
    ~20k local nodes): the trie never holds more than 1.1x its bound, each request keeps the windows of its
    prompt's end, and everything local leaves with the requests."""
    bound = 20_000
    trie = TokenTrie(branch_length=16, max_trie_nodes=bound)
    trie.insert(_lcg_tokens(1, 3000))
    assert 0.9 * bound <= len(trie) <= bound
    prompts = [_lcg_tokens(100 + r, 1500) for r in range(16)]
    for rid, prompt in enumerate(prompts):
        trie.begin_request(rid, prompt)
        assert len(trie) <= 1.1 * bound
    for step in range(20):
        for rid, prompt in enumerate(prompts):
            trie.append(rid, _lcg_tokens(10_000 * rid + step, 3))
            assert len(trie) <= 1.1 * bound
    for rid, prompt in enumerate(prompts):  # the prompt's last windows are local drafts of this request
        tokens, _ = trie.retrieve(prompt[-20:-10], 4, request_id=rid, max_query_length=8)
        assert tokens[:1] == prompt[-10:-9]
    for rid in range(16):
        trie.end_request(rid)
    assert len(trie) <= bound and trie._transient == 0


def test_one_long_prompt_alone_keeps_all_its_windows():
    """Under the local share, nothing changes: every window of the prompt is counted, first to last."""
    trie = TokenTrie(branch_length=8, max_trie_nodes=100_000)
    prompt = _lcg_tokens(7, 1000)
    trie.begin_request(0, prompt)
    for i in (0, 400, 990):
        tokens, _ = trie.retrieve(prompt[i:i + 3], 2, request_id=0, max_query_length=3)
        assert tokens[:1] == prompt[i + 3:i + 4]


def test_retention_under_the_bound_on_replay_with_concurrent_requests():
    """The shipped recording, 16 requests at a time (prompts in, outputs streamed, requests ending) through a
    trie bounded at 20,000 nodes: never more than 1.1x the bound, and once full it keeps >= 80% of the bound."""
    from lookahead.benchmarks.replay import SHIPPED, load_recording

    _, records = load_recording(SHIPPED)
    bound = 20_000
    trie = TokenTrie(branch_length=16, max_trie_nodes=bound)
    full, highest = False, 0
    for batch in range(0, len(records), 16):
        running = list(enumerate(records[batch:batch + 16], start=batch))
        for rid, r in running:
            trie.begin_request(rid, r["prompt_ids"])
            highest = max(highest, len(trie))
        for pos in range(0, max(len(r["output_ids"]) for _, r in running), 4):
            for rid, r in running:
                if pos < len(r["output_ids"]):
                    trie.append(rid, r["output_ids"][pos:pos + 4])
                    highest = max(highest, len(trie))
        for rid, _ in running:
            trie.end_request(rid)
        full = full or len(trie) >= 0.9 * bound
        if full:
            assert len(trie) >= 0.8 * bound
    assert full and highest <= 1.1 * bound


def test_matches_compute_each_match_s_nodes_as_far_as_they_are_read():
    """`matches` hands the drafter each match's nodes as a `Candidates`, expanded only as far as it is read: read
    node by node, in any amount, they are `candidates`' list, the same nodes in the same order, for a trie with
    global and request-local counts, several matches and limits."""
    trie = TokenTrie(branch_length=5, max_trie_nodes=100_000)
    rid = 0
    for seed in range(40):
        trie.begin_request(rid, _lcg_tokens(seed, 60, vocab=12))
        trie.append(rid, _lcg_tokens(seed + 1000, 40, vocab=12))
        trie.end_request(rid)
        rid += 1
    trie.begin_request(rid, _lcg_tokens(7, 80, vocab=12))
    checked = 0
    for seed in range(30):
        context = _lcg_tokens(seed + 500, 6, vocab=12)
        for limit in (1, 3, 16, 64):
            found = trie.matches(context, limit, rid, 4, 3)
            for q, evidence, nodes in found:
                eager = trie.candidates(context, limit, rid, q)
                assert (q, evidence) == eager[:2]
                read = 0
                while nodes.has(read):  # a prefix first, then the rest, as the drafter reads them
                    assert nodes[read] == eager[2][read]
                    read += 1
                assert read == len(eager[2]) == len(nodes) and list(nodes) == eager[2]
                checked += read
    assert checked > 1000
