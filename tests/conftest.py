import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before anything imports triton
# (importing torch does not); with one they are compiled for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_VOCAB = 48  # vocabulary of the tiny_llama models


@pytest.fixture(autouse=True)
def _drafting_gate_held_open(request, monkeypatch):
    """The engine's drafting gate turns drafting off where it measurably costs more per token than plain steps on
    this host (the wall clock of a shared CI machine). Tests check what drafting does, bits and accepted tokens, so
    the gate is off (LOOKAHEAD_DRAFT_GATE=0); tests marked `live_gate` see the real one."""
    if request.node.get_closest_marker("live_gate") is None:
        monkeypatch.setenv("LOOKAHEAD_DRAFT_GATE", "0")


def _tiny_llama(seed: int = 0, **overrides):
    """A random-weight 2-layer Llama (vocab 48, dim 32, GQA 4/2), weights large enough that its greedy
    continuations vary; overrides update the transformers config dict."""
    from lookahead.models import LlamaForLookahead

    torch.manual_seed(seed)
    hf = dict(model_type="llama", vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
              rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=None)
    hf.update(overrides)
    model = LlamaForLookahead(LlamaForLookahead.config_from_hf(hf)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() > 1 else 0.1)
        for m in model.modules():
            if hasattr(m, "eps"):
                m.weight.fill_(1.0)
    return model


def _ours_from_hf(hf_model, cls=None):
    """Our model (LlamaForLookahead unless cls says otherwise) with a transformers model's weights, through the
    same config and state-dict conversion from_pretrained takes."""
    if cls is None:
        from lookahead.models import LlamaForLookahead as cls
    cfg = cls.config_from_hf(hf_model.config.to_dict())
    model = cls(cfg)
    state = cls.convert_state_dict(dict(hf_model.state_dict()), cfg)
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    return model.eval()


@pytest.fixture
def tiny_llama():
    """Factory: tiny_llama(seed=0, **hf_config_overrides) -> a random-weight LlamaForLookahead (fp32, CPU;
    vocab `model.config.vocab_size`, 48 unless overridden)."""
    return _tiny_llama


@pytest.fixture
def ours_from_hf():
    """Function: ours_from_hf(hf_model, cls=LlamaForLookahead) -> our model holding the transformers model's
    weights (for parity tests against transformers)."""
    return _ours_from_hf


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct in fp32 on CPU, with its tokenizer (converted once per cache dir)."""
    from transformers import AutoTokenizer

    from lookahead.models import LlamaForLookahead, resolve_checkpoint

    model = LlamaForLookahead.from_pretrained("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"))
    return model, tokenizer
