"""GLM and GLM-4 parity with transformers on tiny random configs, loading, and lossless lookahead."""

import pytest
import torch
import transformers

from lookahead import LookaheadConfig
from lookahead.models import GlmForLookahead

TINY = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=[1], max_position_embeddings=256)
CONFIGS = {
    "glm": (transformers.GlmConfig, transformers.GlmForCausalLM, {}),
    "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM, {}),
    "glm-odd-rotary": (transformers.GlmConfig, transformers.GlmForCausalLM, {"head_dim": 18}),  # 0.5 * 18 = 9
    "glm4-mha-quarter-rotary": (transformers.Glm4Config, transformers.Glm4ForCausalLM,
                                {"num_key_value_heads": 4, "partial_rotary_factor": 0.25}),
}


def random_glm(name: str, seed: int = 0):
    config_cls, model_cls, extra = CONFIGS[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **extra})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_incremental_logits_match_transformers(name, ours_from_hf):
    hf = random_glm(name)
    if "partial_rotary_factor" in CONFIGS[name][2]:
        assert hf.config.rope_parameters["partial_rotary_factor"] == 0.25
    ours = ours_from_hf(hf, GlmForLookahead)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-4, rtol=1e-4)
        cache = ours.kv_cache(2, 32)
        torch.testing.assert_close(ours.prefill(ids[:, :3], torch.tensor([3, 3]), cache), expected[:, 2],
                                   atol=1e-4, rtol=1e-4)
        for t in range(3, 11):
            step = ours.verify(ids[:, t:t + 1], torch.zeros(2, 1, dtype=torch.long), cache, None)
            cache.lens += 1
            torch.testing.assert_close(step[:, 0], expected[:, t], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["glm", "glm4"])
def test_save_pretrained_dir_loads(tmp_path, name):
    hf = random_glm(name)
    hf.save_pretrained(tmp_path)
    ours = GlmForLookahead.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_llama_class_refuses_glm(tmp_path):
    from lookahead.models import LlamaForLookahead

    random_glm("glm").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="this checkpoint is 'glm'"):
        LlamaForLookahead.from_pretrained(tmp_path, device="cpu")


@pytest.mark.parametrize("name", ["glm", "glm4"])
def test_lookahead_equals_plain_with_a_trie_of_its_own_outputs(name, ours_from_hf):
    ours = ours_from_hf(random_glm(name, seed=5), GlmForLookahead)
    ids = torch.randint(2, TINY["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(1))
    expected = ours.generate(ids, max_new_tokens=48, lookahead=False, eos_token_id=[])
    cfg = LookaheadConfig(adaptive=False, decoding_length=16)
    ours.generate(ids, max_new_tokens=48, lookahead=cfg, eos_token_id=[])  # fills the trie with its own output
    for other in (ids, torch.cat([ids[:, :4], ids[:, :4]], dim=1)):
        want = ours.generate(other, max_new_tokens=48, lookahead=False, eos_token_id=[])
        got = ours.generate(other, max_new_tokens=48, lookahead=cfg, eos_token_id=[], return_dict_in_generate=True)
        assert got.sequences.tolist() == want.tolist()
    again = ours.generate(ids, max_new_tokens=48, lookahead=cfg, eos_token_id=[], return_dict_in_generate=True)
    assert again.sequences.tolist() == expected.tolist()
    assert again.stats.accepted_per_step > 1.5
