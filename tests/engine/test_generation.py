"""Lookahead == plain decoding on tiny random models: EOS and max_new_tokens inside accepted drafts, batches,
random and adversarial trie contents (hypothesis)."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookahead import LookaheadConfig, TokenTrie
from lookahead.engine.pricing import curve_key
from lookahead.benchmarks.replay import replay
from tests.helpers import TINY_VOCAB, make_tiny_llama



def plain(model, ids, **kw):
    return model.generate(ids, lookahead=False, return_dict_in_generate=True, **kw)


def warm(model, ids, n: int = 64, **kw):
    """Fill the trie with the model's own greedy continuation of ids, so that drafts are accepted."""
    model.trie.clear()
    out = model.generate(ids, max_new_tokens=n, lookahead=LookaheadConfig(adaptive=False, **kw), eos_token_id=[])
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("layout", ["hier", "par"])
def test_lookahead_equals_plain_and_accepts_drafts(layout):
    model = make_tiny_llama()
    ids = torch.randint(0, TINY_VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    cfg = LookaheadConfig(layout=layout, adaptive=False, decoding_length=16)
    expected = plain(model, ids, max_new_tokens=80, eos_token_id=[])
    cold = model.generate(ids, max_new_tokens=80, lookahead=cfg, eos_token_id=[], return_dict_in_generate=True)
    hot = model.generate(ids, max_new_tokens=80, lookahead=cfg, eos_token_id=[], return_dict_in_generate=True)
    assert cold.sequences.tolist() == expected.sequences.tolist()
    assert hot.sequences.tolist() == expected.sequences.tolist()
    assert hot.stats.accepted_per_step > 2.0  # the trie holds this very output: drafts must be accepted
    assert hot.stats.steps < expected.stats.steps
    assert hot.stats.new_tokens == expected.stats.new_tokens == 80


def test_eos_inside_an_accepted_draft_ends_the_output_there():
    model = make_tiny_llama(1)
    ids = torch.randint(0, TINY_VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    truth = warm(model, ids)
    # an eos token that first occurs deep in the output, so it arrives inside an accepted multi-token draft
    pos = next(i for i in range(5, len(truth)) if truth[i] not in truth[:i])
    eos = truth[pos]
    got = model.generate(ids, max_new_tokens=64, lookahead=LookaheadConfig(adaptive=False), eos_token_id=eos,
                         return_dict_in_generate=True)
    assert got.sequences[0, ids.shape[1]:].tolist() == truth[:pos + 1]
    assert got.stats.accepted_per_step > 1.5
    assert plain(model, ids, max_new_tokens=64, eos_token_id=eos).sequences.tolist() == got.sequences.tolist()


@pytest.mark.parametrize("max_new", [1, 2, 13, 31])
def test_max_new_tokens_is_never_exceeded_even_mid_draft(max_new):
    model = make_tiny_llama(2)
    ids = torch.randint(0, TINY_VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    truth = warm(model, ids)
    got = model.generate(ids, max_new_tokens=max_new, lookahead=LookaheadConfig(adaptive=False), eos_token_id=[],
                         return_dict_in_generate=True)
    assert got.sequences[0, ids.shape[1]:].tolist() == truth[:max_new]
    assert got.stats.new_tokens == max_new
    if max_new > 2:
        assert got.stats.steps < max_new  # multi-token steps happened, and were cut at the limit


def test_stats_count_prefill_and_drafts():
    model = make_tiny_llama()
    ids = torch.randint(0, TINY_VOCAB, (1, 7), generator=torch.Generator().manual_seed(6))
    out = plain(model, ids, max_new_tokens=10, eos_token_id=[])
    assert (out.stats.steps, out.stats.decode_steps, out.stats.new_tokens, out.stats.draft_tokens) == (10, 9, 10, 0)
    truth = plain(model, ids, max_new_tokens=60, eos_token_id=[]).sequences[0, 7:].tolist()
    model.trie.clear()
    model.trie.insert(truth[:40])  # a trie that knows the first part of the output, and some noise
    model.trie.insert([truth[5], 1, 2, 3, truth[9], truth[10], 4])
    cfg = LookaheadConfig(adaptive=False, decoding_length=8, recycle_top_k=0)
    # the same drafts replayed without the model give the exact counts a lookahead call must report
    expected = replay([{"prompt_ids": ids[0].tolist(), "output_ids": truth, "topk": []}], cfg, {1: 1.0},
                      recycle=False, trie=copy.deepcopy(model.trie))["ALL"]
    la = model.generate(ids, max_new_tokens=60, lookahead=cfg, eos_token_id=[], return_dict_in_generate=True)
    assert la.sequences[0, 7:].tolist() == truth
    s = la.stats
    assert (s.steps, s.decode_steps, s.new_tokens, s.draft_tokens) == (
        1 + expected.steps, expected.steps, 60, expected.draft_nodes)
    assert expected.steps < 40 and s.prefill_s > 0 and s.decode_s > 0


def test_adaptive_policy_follows_the_cost_curve():
    model = make_tiny_llama()
    ids = torch.randint(0, TINY_VOCAB, (1, 7), generator=torch.Generator().manual_seed(6))
    truth = warm(model, ids)
    sizes = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)  # the buckets up to decoding_length 64 + the root
    key = curve_key(model)
    model.state.cost_curves[key] = {T: float(T) for T in sizes}  # every node costs a whole step: nothing pays
    dear = model.generate(ids, max_new_tokens=40, eos_token_id=[], return_dict_in_generate=True)
    model.state.cost_curves[key] = {T: 1.0 for T in sizes}  # nodes are free: draft the whole budget
    free = model.generate(ids, max_new_tokens=40, eos_token_id=[], return_dict_in_generate=True)
    assert dear.sequences[0, 7:].tolist() == free.sequences[0, 7:].tolist() == truth[:40]
    assert dear.stats.draft_tokens == 0 and dear.stats.decode_steps == 39
    assert free.stats.draft_tokens_per_step > 8 and free.stats.decode_steps < 20


def test_stop_strings_cut_inside_an_accepted_draft():
    class Letters:  # token i reads as one letter
        def decode(self, ids):
            return "".join(chr(ord("a") + i % 26) for i in ids)

    model = make_tiny_llama(5)
    ids = torch.randint(0, TINY_VOCAB, (1, 6), generator=torch.Generator().manual_seed(11))
    truth = warm(model, ids)
    text = Letters().decode(truth)
    at = next(i for i in range(8, len(text) - 2) if text[i:i + 2] not in text[:i + 1])  # first seen at i
    stop = text[at:at + 2]
    la = model.generate(ids, max_new_tokens=64, lookahead=LookaheadConfig(adaptive=False), eos_token_id=[],
                        stop_strings=[stop, "@@"], tokenizer=Letters(), return_dict_in_generate=True)
    assert la.sequences[0, 6:].tolist() == truth[:at + 2]  # ends with the token that completes the string
    assert la.stats.accepted_per_step > 1.5  # the cut fell inside multi-token steps
    assert plain(model, ids, max_new_tokens=64, eos_token_id=[], stop_strings=stop,
                 tokenizer=Letters()).sequences.tolist() == la.sequences.tolist()
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, stop_strings=["x"])
    with pytest.raises(ValueError, match="stop_strings"):
        model.generate(ids, stop_strings=[""], tokenizer=Letters())


@pytest.mark.parametrize("eos", ["x", 1.5, [1, "2"], [TINY_VOCAB], -1, True])
def test_bad_eos_token_id_is_a_value_error(eos):
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(torch.tensor([[1, 2]]), eos_token_id=eos)


def test_forget_drafting_forgets_what_outputs_taught():
    model = make_tiny_llama()
    ids = torch.randint(0, TINY_VOCAB, (1, 7), generator=torch.Generator().manual_seed(6))
    warm(model, ids)
    assert len(model.trie) and model.state.successors and model.state.calibration.stats
    model.state.forget_drafting()
    assert not len(model.trie) and not model.state.successors and not model.state.calibration.stats


def test_model_trie_is_always_a_token_trie_and_an_incompatible_one_is_refused():
    model = make_tiny_llama()
    assert isinstance(model.trie, TokenTrie) and len(model.trie) == 0
    with pytest.raises(ValueError, match="TokenTrie"):
        model.trie = None
    small = TokenTrie(branch_length=16, max_trie_nodes=64)  # another bound: compatible, used as it is
    model.trie = small
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8)
    assert model.trie is small and 0 < len(small) <= 64
    model.trie = TokenTrie(branch_length=6)  # e.g. saved with other settings: the default config adopts it
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8)
    before = len(model.trie)
    assert before > 0
    with pytest.raises(ValueError, match="branch_length is 6 but LookaheadConfig.branch_length is 16"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, lookahead=LookaheadConfig(adaptive=False))
    assert len(model.trie) == before
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, lookahead=LookaheadConfig(branch_length=6))


def test_adaptive_budget_stays_lossless():
    model = make_tiny_llama(3)
    ids = torch.randint(0, TINY_VOCAB, (1, 8), generator=torch.Generator().manual_seed(7))
    expected = plain(model, ids, max_new_tokens=60, eos_token_id=[]).sequences
    for _ in range(2):
        got = model.generate(ids, max_new_tokens=60, eos_token_id=[])
        assert got.tolist() == expected.tolist()


def test_trie_is_not_changed_by_a_rejected_call():
    model = make_tiny_llama()
    ids = torch.randint(0, TINY_VOCAB, (1, 7), generator=torch.Generator().manual_seed(8))
    warm(model, ids)
    before = len(model.trie)
    with pytest.raises(ValueError):
        model.generate(ids, references=["needs a tokenizer"])
    with pytest.raises(ValueError):
        model.generate(ids, max_new_tokens=10_000)
    assert len(model.trie) == before


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), prompt_len=st.integers(1, 12), max_new=st.integers(1, 40),
       layout=st.sampled_from(["hier", "par"]), decoding_length=st.sampled_from([1, 3, 8, 24, 63]),
       noise=st.lists(st.lists(st.integers(0, TINY_VOCAB - 1), min_size=2, max_size=16), max_size=6),
       diverge=st.lists(st.tuples(st.integers(0, 40), st.integers(0, TINY_VOCAB - 1)), max_size=6))
def test_property_lookahead_equals_plain_with_random_and_adversarial_tries(seed, prompt_len, max_new, layout,
                                                                          decoding_length, noise, diverge):
    model = make_tiny_llama(seed % 7)
    ids = torch.randint(0, TINY_VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    expected = plain(model, ids, max_new_tokens=max_new, eos_token_id=[]).sequences
    truth = expected[0].tolist()
    cfg = LookaheadConfig(layout=layout, decoding_length=decoding_length, adaptive=False, branch_length=8)
    model.trie = TokenTrie(branch_length=cfg.branch_length, max_trie_nodes=cfg.max_trie_nodes)
    for seq in noise:
        model.trie.insert(seq)
    for cut, token in diverge:  # share a prefix with the truth, then diverge
        cut = min(cut, len(truth) - 1)
        model.trie.insert(truth[max(0, cut - 6):cut] + [token] + truth[cut + 1:cut + 4], weight=3)
    got = model.generate(ids, max_new_tokens=max_new, lookahead=cfg, eos_token_id=[])
    assert got[0].tolist() == truth


def test_batch_rows_equal_rows_alone():
    model = make_tiny_llama(4)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, TINY_VOCAB, (n,), generator=g) for n in (3, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = p
        mask[b, width - len(p):] = 1
    alone = [plain(model, p[None], max_new_tokens=30, eos_token_id=[]).sequences[0, len(p):].tolist()
             for p in prompts]
    for lookahead in (False, LookaheadConfig(adaptive=False)):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[], lookahead=lookahead)
        assert [row[width:].tolist() for row in out] == alone
