"""Greedy lookahead == plain greedy on SmolLM2 (fp32, CPU) over Spec-Bench, and references raise acceptance."""

import itertools

import pytest
import torch

from lookahead import LookaheadConfig
from tests.test_smollm2 import chat_ids, spec_bench_prompts

# (layout, warm trie, with references): every combination, spread over the prompts
VARIANTS = list(itertools.product(["hier", "par"], [False, True], [False, True]))


@pytest.mark.slow
def test_lookahead_equals_plain_on_40_spec_bench_prompts(smollm2):
    model, tokenizer = smollm2
    prompts = spec_bench_prompts(4)[:40]
    assert len(prompts) == 40 and len({c for c, _ in prompts}) == 13
    model.trie = None
    accepted = {True: [], False: []}
    for k, (category, text) in enumerate(prompts):
        layout, warm, with_refs = VARIANTS[k % len(VARIANTS)]
        ids = chat_ids(tokenizer, text)
        expected = model.generate(ids, max_new_tokens=128, lookahead=False)
        if not warm and model.trie is not None:
            model.trie.clear()
        refs = [prompts[(k + 1) % len(prompts)][1]] if with_refs else None
        out = model.generate(ids, max_new_tokens=128, lookahead=LookaheadConfig(layout=layout), references=refs,
                             tokenizer=tokenizer, return_dict_in_generate=True)
        assert out.sequences.tolist() == expected.tolist(), (category, layout, warm, with_refs, text[:80])
        accepted[warm].append(out.stats.accepted_per_step)
    assert sum(accepted[True]) / len(accepted[True]) > 1.2  # drafts are really being accepted


@pytest.mark.slow
def test_references_with_the_copied_passage_raise_accepted_tokens_per_step(smollm2):
    """RAG style: the reference passage holds the text the answer copies. The count is deterministic."""
    model, tokenizer = smollm2
    cfg = LookaheadConfig(adaptive=False, decoding_length=15)
    for _, question in spec_bench_prompts(3):
        if not question.startswith("Who") and not question.startswith("What"):
            continue
        ids = chat_ids(tokenizer, question)
        answer = tokenizer.decode(model.generate(ids, max_new_tokens=48, lookahead=False)[0, ids.shape[1]:],
                                  skip_special_tokens=True)
        passage = "From the encyclopedia. " + answer + " See also the related articles."
        model.trie = None
        without = model.generate(ids, max_new_tokens=48, lookahead=cfg, return_dict_in_generate=True)
        model.trie = None
        with_ref = model.generate(ids, max_new_tokens=48, lookahead=cfg, references=[passage], tokenizer=tokenizer,
                                  return_dict_in_generate=True)
        assert with_ref.sequences.tolist() == without.sequences.tolist()
        assert with_ref.stats.accepted_per_step > without.stats.accepted_per_step + 0.5, question
        # the reference was local to that request: its own words are gone from the trie afterwards
        lead = tokenizer("From the encyclopedia.", add_special_tokens=False).input_ids
        assert model.trie.retrieve(lead[:3], 8, max_query_length=2) == ([], [])  # "... the encyclopedia"
        return
    pytest.fail("no question-style prompt found")
