"""The CPU path is exact by construction (lookahead.kernels.cpu): a node verified among T gets, bit for bit, the
logits of the one-token step that later decodes its token, in fp32, bf16 and fp16, whatever the tree, the batch
rows or the prefix. The CPU twin of tests/kernels/test_exact_verify.py (CUDA's exact mode)."""

import pytest
import torch

from lookahead import LookaheadConfig
from lookahead.kernels import cpu as cpu_ops
from lookahead.models import LlamaForLookahead
from tests.helpers import root_paths

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="the C++ CPU ops could not be built here")

VOCAB = 97


def tiny(dtype: torch.dtype, seed: int = 0) -> LlamaForLookahead:
    """A 2-layer Llama (dim 64, GQA 4/2, head dim 16 with an odd intermediate size) in dtype."""
    torch.manual_seed(seed)
    hf = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
              rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=None)
    model = LlamaForLookahead(LlamaForLookahead.config_from_hf(hf)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
    return model.to(dtype)


def random_tree(T: int, gen: torch.Generator) -> list[int]:
    """parents of a random tree of T nodes in DFS-compatible order (parents[i] < i), with chains and fan-out."""
    return [-1] + [int(torch.randint(max(0, i - 4), i, (1,), generator=gen)) for i in range(1, T)]


def check_tree_step_equals_one_token_steps(model, prefixes: list[int], T: int, seed: int) -> None:
    """Verify B rows of random trees after prefixes of the given lengths, then decode every root-to-leaf path one
    token at a time in a row of its own, and compare each node's logits bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    B, S = len(prefixes), max(prefixes) + T + 1
    cache = model.kv_cache(B, S)
    width = max(max(prefixes), 1)
    prompts = torch.randint(0, VOCAB, (B, width), generator=gen)
    lengths = torch.tensor(prefixes)
    with torch.inference_mode():
        if max(prefixes) > 0:
            model.prefill(prompts, lengths.clamp(min=1), cache)
        cache.lens.copy_(lengths)
        tokens = torch.randint(0, VOCAB, (B, T), generator=gen)
        parents = [random_tree(T, gen) for _ in range(B)]
        paths = [root_paths(p) for p in parents]
        depths = torch.tensor([[len(path) - 1 for path in row] for row in paths])
        mask = torch.zeros(B, T, T, dtype=torch.bool)
        for b, row in enumerate(paths):
            for i, path in enumerate(row):
                mask[b, i, path] = True
        before = cache.buffer.clone()
        got = model.verify(tokens, depths, cache, mask)  # (B, T, V)
        for b in range(B):
            leaves = [i for i in range(T) if i not in parents[b]]
            for leaf in leaves:
                alone = model.kv_cache(1, S)
                alone.buffer.copy_(before[:, :, b:b + 1])  # this row's committed prefix, nothing else
                alone.lens.fill_(prefixes[b])
                for node in paths[b][leaf]:
                    one = model.verify(tokens[b:b + 1, node:node + 1], torch.zeros(1, 1, dtype=torch.long), alone,
                                       None)[0, 0]
                    assert torch.equal(one, got[b, node]), (
                        f"{model.dtype} row {b} node {node} (prefix {prefixes[b]}, T {T}): max diff "
                        f"{(one.float() - got[b, node].float()).abs().max().item():.3g}")
                    alone.lens += 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("prefixes,T", [([0], 7), ([37], 16), ([300, 5, 37], 64), ([2048], 9),
                                         ([3, 37, 0, 11, 300, 1, 64, 20], 13)])
def test_verify_logits_equal_one_token_logits_along_every_path(dtype, prefixes, T):
    check_tree_step_equals_one_token_steps(tiny(dtype), prefixes, T, seed=T + len(prefixes))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_lookahead_equals_plain(dtype):
    model = tiny(dtype, seed=3)
    prompt = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    prompt = torch.cat([prompt, prompt[:, :20]], dim=1)  # a repeat gives the drafter something to copy
    plain = model.generate(prompt, max_new_tokens=48, lookahead=False)
    # adaptive=False: the drafts verified must not depend on this machine's timing
    out = model.generate(prompt, max_new_tokens=48, lookahead=LookaheadConfig(adaptive=False, decoding_length=16),
                         return_dict_in_generate=True)
    assert out.sequences.tolist() == plain.tolist()
    assert out.stats.accepted_per_step > 1.0  # drafts were really verified and accepted


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64-v4"], ids=["avx2", "avx512-without-bf16"])
def test_other_hosts_code_paths_are_exact_too(arch, tmp_path):
    """The ops built for another ISA (an AVX2-only host; AVX-512 without AVX512_BF16), in a fresh process: the same
    bitwise checks hold on each code path."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    code = ("import torch, tests.kernels.cpu.test_exact as t\n"
            "from lookahead.kernels import cpu\n"
            "assert cpu.available()\n"
            "for dt in (torch.bfloat16, torch.float16, torch.float32):\n"
            "    t.check_tree_step_equals_one_token_steps(t.tiny(dt), [300, 5, 37], 33, seed=4)\n"
            "    t.check_tree_step_equals_one_token_steps(t.tiny(dt), [0], 7, seed=5)\n"
            "print('exact')\n")
    env = {**os.environ, "LOOKAHEAD_CPU_ARCH": arch}
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "exact" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_ragged_step_gives_each_row_the_bits_of_its_own_padded_step(dtype):
    """One ragged step: row 0 a tree of 5 nodes after a prefix of 37, row 1 a prompt chunk of 9 tokens (a causal
    chain) with a 3-node tree under its last token, row 2 nothing, row 3 a lone root. Every token's logits, and
    every K/V written, equal those of each row verified alone in the padded layout, bit for bit; the LM head on a
    subset of tokens gives those tokens' bits too."""
    from lookahead.drafting.tree import DraftTree, pack_ragged

    model = tiny(dtype, seed=3)
    gen = torch.Generator().manual_seed(9)
    prefixes = [37, 4, 11, 20]
    cache = model.kv_cache(4, 64)
    with torch.inference_mode():
        model.prefill(torch.randint(0, VOCAB, (4, 37), generator=gen), torch.tensor(prefixes), cache)
        alone = model.kv_cache(4, 64)
        alone.buffer.copy_(cache.buffer)
        alone.lens.copy_(cache.lens)
        chain = torch.randint(0, VOCAB, (9,), generator=gen).tolist()
        trees = [DraftTree(torch.randint(0, VOCAB, (5,), generator=gen).tolist(), [-1, 0, 1, 0, 3], [0, 1, 2, 1, 2]),
                 DraftTree(torch.randint(0, VOCAB, (3,), generator=gen).tolist(), [-1, 0, 0], [0, 1, 1]), None,
                 DraftTree([int(torch.randint(0, VOCAB, (1,), generator=gen))], [-1], [0])]
        batch = pack_ragged([[], chain, [], []], trees, "cpu")
        assert batch.num_tokens == 5 + 9 + 3 + 1 and not batch.uniform
        got = model.verify_ragged(batch.tokens, batch.rows, batch.nodes, batch.depths, cache, batch.mask)
        heads = model.verify_ragged(batch.tokens, batch.rows, batch.nodes, batch.depths, cache, batch.mask,
                                    batch.logit_index)
        assert torch.equal(heads, got[batch.logit_index])
        for b, (prefix, tree) in enumerate(zip([[], chain, [], []], trees)):
            if tree is None:
                continue
            P, T = len(prefix), len(tree.tokens)
            tokens = torch.tensor([prefix + tree.tokens])
            depths = torch.tensor([list(range(P)) + [P + d for d in tree.depths]])
            parents = [i - 1 for i in range(P)] + [P - 1 if p < 0 else P + p for p in tree.parents]
            mask = torch.zeros(1, P + T, P + T, dtype=torch.bool)
            for i in range(P + T):
                j = i
                while j >= 0:
                    mask[0, i, j] = True
                    j = parents[j]
            ref = model.verify(tokens, depths, alone.rows(b, b + 1), mask)[0]  # (P + T, V)
            assert torch.equal(got[batch.rows == b], ref), f"row {b}"
            n = prefixes[b] + P + T
            assert torch.equal(cache.buffer[:, :, b, :, :n], alone.buffer[:, :, b, :, :n]), f"row {b}'s K/V"
