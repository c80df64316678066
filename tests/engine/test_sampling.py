"""Lossless sampling over draft trees: seeded runs equal plain sampling, the distribution is the model's."""

import itertools

import pytest
import torch

from lookahead import LookaheadConfig
from lookahead.kernels import gumbel_noise
from lookahead.drafting.trie import TokenTrie
from tests.helpers import chat_ids, make_tiny_llama, spec_bench_prompts

SETTINGS = [dict(temperature=0.7), dict(temperature=1.0, top_k=20), dict(temperature=0.8, top_p=0.9),
            dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.3), dict(temperature=0.5,
                                                                                       repetition_penalty=1.1)]


def fill_trie(model, cfg, vocab, seed=0, n=200):
    g = torch.Generator().manual_seed(seed)
    model.trie = TokenTrie(cfg.branch_length, cfg.max_trie_nodes)
    for _ in range(n):
        model.trie.insert(torch.randint(0, vocab, (12,), generator=g).tolist())


@pytest.mark.parametrize("setting", SETTINGS)
def test_same_seed_same_tokens_on_a_tiny_model(setting):
    model = make_tiny_llama(2)
    cfg = LookaheadConfig(adaptive=False, decoding_length=24)
    ids = torch.randint(0, 48, (1, 6), generator=torch.Generator().manual_seed(1))
    fill_trie(model, cfg, 48)
    for seed in range(6):
        plain = model.generate(ids, max_new_tokens=40, do_sample=True, seed=seed, lookahead=False, eos_token_id=[],
                               **setting)
        la = model.generate(ids, max_new_tokens=40, do_sample=True, seed=seed, lookahead=cfg, eos_token_id=[],
                            return_dict_in_generate=True, **setting)
        assert la.sequences.tolist() == plain.tolist()
    other = model.generate(ids, max_new_tokens=40, do_sample=True, seed=99, lookahead=False, eos_token_id=[], **setting)
    assert other.tolist() != plain.tolist()  # the seed matters


@pytest.mark.slow
def test_same_seed_same_tokens_on_smollm2(smollm2_half):
    """SmolLM2 in bf16 (the default dtype where the CPU has native bf16): a seeded lookahead run samples plain
    sampling's tokens, on 10 Spec-Bench prompts under five sampling settings."""
    models, tokenizer = smollm2_half
    model = models[torch.bfloat16]
    prompts = spec_bench_prompts(1)[:10]
    accepted = []
    for k, (_, text) in enumerate(prompts):
        setting = SETTINGS[k % len(SETTINGS)]
        ids = chat_ids(tokenizer, text)
        plain = model.generate(ids, max_new_tokens=64, do_sample=True, seed=k, lookahead=False, **setting)
        la = model.generate(ids, max_new_tokens=64, do_sample=True, seed=k, return_dict_in_generate=True,
                            references=[text], tokenizer=tokenizer, **setting,
                            lookahead=LookaheadConfig(adaptive=False, decoding_length=12))  # timing-free acceptance
        assert la.sequences.tolist() == plain.tolist(), (setting, text[:60])
        accepted.append(la.stats.accepted_per_step)
    assert max(accepted) > 1.0  # drafts were accepted under sampling


def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def test_sampled_distribution_matches_the_model_under_lookahead():
    """Two sampled tokens after a prompt, over many seeds, against the analytic joint distribution, with a
    trie that drafts every continuation (chi-square, significance 0.001)."""
    V = 6
    model = make_tiny_llama(5, vocab_size=V)
    ids = torch.tensor([[1, 2, 3]])
    temperature = 1.3
    with torch.no_grad():
        p1 = (model(ids).logits[0, -1] / temperature).softmax(-1).double()
        joint = torch.zeros(V, V, dtype=torch.float64)
        for a in range(V):
            p2 = (model(torch.tensor([[1, 2, 3, a]])).logits[0, -1] / temperature).softmax(-1).double()
            joint[a] = p1[a] * p2
    cfg = LookaheadConfig(adaptive=False, decoding_length=40, branch_length=4)
    model.trie = TokenTrie(cfg.branch_length, cfg.max_trie_nodes)
    for a, b in itertools.product(range(V), repeat=2):  # every two-token continuation of 3 is drafted
        model.trie.insert([3, a, b])
    n = 1000
    counts = torch.zeros(V, V, dtype=torch.float64)
    for seed in range(n):
        out = model.generate(ids, max_new_tokens=3, do_sample=True, temperature=temperature, seed=seed,
                             lookahead=cfg, eos_token_id=[], return_dict_in_generate=True)
        a, b, _ = out.sequences[0, 3:].tolist()
        counts[a, b] += 1
        # prefill, then one verify step: every second token is a draft node, so it is always accepted
        assert out.stats.steps == 2
    assert chi_square_p(counts.flatten(), joint.flatten() * n) > 1e-3
    assert chi_square_p(counts.sum(1), p1 * n) > 1e-3


def test_top_k_one_is_greedy():
    model = make_tiny_llama(3)
    ids = torch.randint(0, 48, (1, 5), generator=torch.Generator().manual_seed(2))
    greedy = model.generate(ids, max_new_tokens=30, lookahead=False, eos_token_id=[])
    for lookahead in (False, LookaheadConfig(adaptive=False)):
        sampled = model.generate(ids, max_new_tokens=30, do_sample=True, top_k=1, seed=3, lookahead=lookahead,
                                 eos_token_id=[])
        assert sampled.tolist() == greedy.tolist()


def test_greedy_repetition_penalty_is_lossless():
    model = make_tiny_llama(4)
    ids = torch.randint(0, 48, (1, 5), generator=torch.Generator().manual_seed(3))
    plain = model.generate(ids, max_new_tokens=40, lookahead=False, repetition_penalty=1.5, eos_token_id=[])
    assert plain.tolist() != model.generate(ids, max_new_tokens=40, lookahead=False, eos_token_id=[]).tolist()
    cfg = LookaheadConfig(adaptive=False)
    fill_trie(model, cfg, 48)
    model.trie.insert(plain[0].tolist())
    la = model.generate(ids, max_new_tokens=40, lookahead=cfg, repetition_penalty=1.5, eos_token_id=[],
                        return_dict_in_generate=True)
    assert la.sequences.tolist() == plain.tolist() and la.stats.accepted_per_step > 1.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(temperature=-1.0), "temperature must be > 0"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(seed=-3), "seed"),
])
def test_invalid_sampling_arguments(kwargs, match):
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[1, 2]]), do_sample=True, **kwargs)


def test_noise_is_a_pure_function_of_seed_row_and_position():
    rows = torch.tensor([0, 1])
    pos = torch.tensor([[5, 6, 6], [5, 7, 8]])
    noise = gumbel_noise(7, rows, pos, 100)
    assert torch.equal(noise[0, 1], noise[0, 2])            # same position, same noise
    assert not torch.equal(noise[0, 0], noise[1, 0])        # rows differ
    assert torch.equal(gumbel_noise(7, rows[:1], pos[:1, 1:2], 100)[0, 0], noise[0, 1])
    u = torch.exp(-torch.exp(-gumbel_noise(1, torch.tensor([0]), torch.arange(400)[None], 1000).flatten()))
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005  # uniform underneath
