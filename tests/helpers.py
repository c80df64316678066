"""Helpers the tests share: tiny random models, transformers twins, Spec-Bench prompts, golden tries and trees."""

from types import SimpleNamespace

import numpy as np
import torch
import transformers

from lookahead import TokenTrie
from lookahead.data import encode_prompt, spec_bench_first_turns


TINY_VOCAB = 48  # vocabulary of the tiny_llama models


def make_tiny_llama(seed: int = 0, **overrides):
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


def make_ours_from_hf(hf_model, cls=None):
    """Our model (LlamaForLookahead unless cls says otherwise) with a transformers model's weights, through the
    same config and state-dict conversion from_pretrained takes."""
    if cls is None:
        from lookahead.models import LlamaForLookahead as cls
    cfg = cls.config_from_hf(hf_model.config.to_dict())
    model = cls(cfg)
    state = cls.convert_state_dict(dict(hf_model.state_dict()), cfg)
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    return model.eval()


TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "llama-tied-mha": lambda: transformers.LlamaConfig(**{**TINY, "num_key_value_heads": 4},
                                                       tie_word_embeddings=True),
    "llama3-rope": lambda: transformers.LlamaConfig(**TINY, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "llama-linear-rope": lambda: transformers.LlamaConfig(**TINY, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama-head-dim": lambda: transformers.LlamaConfig(**{**TINY, "num_attention_heads": 8, "num_key_value_heads": 4},
                                                       head_dim=24, attention_bias=True),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
}

HF_CLASSES = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
              "qwen2": transformers.Qwen2ForCausalLM}


def random_hf(name: str, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    model = HF_CLASSES[config.model_type](config).eval()
    with torch.no_grad():  # random biases and norms, so that a dropped bias or norm would show
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def spec_bench_prompts(per_category: int) -> list[tuple[str, str]]:
    """(category, first turn) pairs of the packaged Spec-Bench, round-robin over categories."""
    return spec_bench_first_turns(per_category)


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    return encode_prompt(tokenizer, text, chat=True)


def golden_trie() -> TokenTrie:
    trie = TokenTrie(branch_length=4, max_trie_nodes=1000)
    trie.insert([1, 2, 3, 7])
    trie.insert([1, 2, 3, 8])
    trie.insert([1, 2, 4])
    return trie


def random_tree_mask(B, T, g):
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)]
        for i in range(T):
            mask[b, i, i] = True
            if i:
                mask[b, i] |= mask[b, parents[i]]
    return mask


def root_paths(parents: list[int]) -> list[list[int]]:
    """Node indices root .. i for every node i."""
    paths = []
    for i in range(len(parents)):
        path = [i]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        paths.append(path[::-1])
    return paths


def vllm_config(k, max_model_len=64):
    """What a vLLM proposer reads of vLLM's config: the draft length and the model's context."""
    return SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=k, prompt_lookup_max=None),
                           model_config=SimpleNamespace(max_model_len=max_model_len))


class VllmBatch:
    """vLLM's persistent batch as the proposer sees it: token_ids_cpu [max_num_seqs, max_model_len] int32 and
    num_tokens_no_spec [max_num_seqs] int32."""

    def __init__(self, rows=4, max_model_len=64):
        self.tokens = np.zeros((rows, max_model_len), dtype=np.int32)
        self.lengths = np.zeros(rows, dtype=np.int32)

    def put(self, row, seq):
        self.tokens[row] = 0
        self.tokens[row, :len(seq)] = seq
        self.lengths[row] = len(seq)

    def commit(self, row, new):
        n = self.lengths[row]
        self.tokens[row, n:n + len(new)] = new
        self.lengths[row] = n + len(new)

    def row(self, row):
        return self.tokens[row, :self.lengths[row]].tolist()
