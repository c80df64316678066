"""Llama-family parity with transformers on tiny random configs (litgpt style), fp32 on CPU."""

import pytest
import torch

from lookahead.kernels import cpu as cpu_build
from lookahead.models import LlamaForLookahead
from tests.helpers import CONFIGS, TINY, random_hf


@pytest.mark.parametrize("cpu_ops", [False, True], ids=["torch-ops", "cpu-ops"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_incremental_logits_match_transformers(name, cpu_ops, ours_from_hf, monkeypatch):
    hf = random_hf(name)
    ours = ours_from_hf(hf)
    if not cpu_ops:
        monkeypatch.setenv("LOOKAHEAD_KERNELS", "torch")  # the registry's torch references on the CPU
    elif not cpu_build.available():
        pytest.skip("the C++ CPU ops could not be built here")
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-4, rtol=1e-4)

        # prefill 3 tokens, then 8 incremental one-token steps through the static cache
        cache = ours.kv_cache(2, 32)
        logits = ours.prefill(ids[:, :3], torch.tensor([3, 3]), cache)
        torch.testing.assert_close(logits, expected[:, 2], atol=1e-4, rtol=1e-4)
        for t in range(3, 11):
            step = ours.verify(ids[:, t:t + 1], torch.zeros(2, 1, dtype=torch.long), cache, None)
            cache.lens += 1
            torch.testing.assert_close(step[:, 0], expected[:, t], atol=1e-4, rtol=1e-4)


def test_verify_chain_of_several_tokens_matches_full_forward(ours_from_hf):
    hf = random_hf("llama3-rope")
    ours = ours_from_hf(hf)
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():
        expected = hf(ids).logits
        cache = ours.kv_cache(1, 32)
        ours.prefill(ids[:, :5], torch.tensor([5]), cache)
        chain = ours.verify(ids[:, 5:], torch.arange(7)[None], cache, None)
    torch.testing.assert_close(chain, expected[:, 5:], atol=1e-4, rtol=1e-4)


def test_generate_plain_greedy_matches_transformers(ours_from_hf):
    hf = random_hf("qwen2")
    ours = ours_from_hf(hf)
    ids = torch.randint(0, TINY["vocab_size"], (1, 7))
    expected = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                           min_new_tokens=20)
    got = ours.generate(ids, max_new_tokens=20, lookahead=False, eos_token_id=[])
    assert torch.equal(got, expected)


def test_unknown_model_type_is_rejected():
    with pytest.raises(ValueError, match="serves model_type llama, mistral, qwen2"):
        LlamaForLookahead.config_from_hf({"model_type": "gpt2"})
