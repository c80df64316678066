"""GGUF files running on their quantized blocks (lookahead/models/gguf.py over kernels/cpu/quant.cpp): the embedded
SmolLM2 (Q4_1, its embedding Q8_0) loads as uint8 block views, stays close to the dequantized model, and is exact:
a verified node gets the bits of its one-token step on every path of random trees, for every block format and ISA
path, so lookahead returns plain greedy's tokens."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lookahead.kernels import cpu as cpu_ops
from lookahead.models import LlamaForLookahead
from lookahead.models.gguf import QuantEmbedding, SplitLinear, describe, repacked
from tests.kernels.cpu.test_quant import FORMATS, REPACKED, random_weight
from tests.kernels.cpu.test_exact import check_tree_step_equals_one_token_steps

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="the C++ CPU ops could not be built here")

TEXT = ("The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers that changed "
        "physics: on the photoelectric effect, Brownian motion, special relativity and the equivalence of mass and "
        "energy. def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n")


@pytest.fixture(scope="module")
def quantized():
    return LlamaForLookahead.from_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tokenizer():
    from lookahead.models.gguf import gguf_file, tokenizer

    return tokenizer(gguf_file("smollm2-135m-instruct"))


def test_the_embedded_gguf_loads_as_its_own_blocks(quantized):
    m = quantized
    assert m.dtype == (torch.bfloat16 if cpu_ops.native_bf16() else torch.float32)
    assert m.config.rope_interleaved and m.config.tie_word_embeddings
    assert m.tok_embeddings.weight.dtype == torch.uint8 and m.tok_embeddings.weight.shape == (49152, 18, 34)  # Q8_0
    assert m.output.weight.shape == (49152 // 8, 9, 544)  # the tied head: the table's blocks as Q8_0 x8
    layer = m.layers[0]
    assert layer.feed_forward.w13.weight.shape == (2 * 1536 // 8, 9, 320)  # gate and up lie back to back: Q4_1 x8
    assert layer.feed_forward.w2.weight.shape == (576 // 8, 24, 320)
    qkv = layer.attention.wqkv  # q, k, v lie apart in the file, of one type: repacked into one weight
    assert not isinstance(qkv, SplitLinear) and qkv.weight.shape == ((576 + 192 + 192) // 8, 9, 320)
    assert layer.attention_norm.weight.dtype == m.dtype
    assert "quantized (Q4_1 x8, Q8_0, Q8_0 x8" in describe(m)
    total = sum(p.numel() for p in m.parameters() if p.dtype == torch.uint8)
    assert 110e6 < total < 130e6  # the file's bytes and the head's copy, not a dequantized copy (135M params x 4 B)


def test_our_gguf_reader_reads_what_gguf_py_reads(tmp_path):
    """models/gguf.py's own header reader against gguf-py's GGUFReader on the embedded file: every metadata field
    (arrays of strings and numbers included), every tensor's type, shape, offset, size and bytes; a truncated copy
    and a wrong magic are ValueErrors that name the file."""
    import numpy as np
    from gguf import GGUFReader

    from lookahead.models.gguf import GGUFFile, _Reader, gguf_file

    path = gguf_file("smollm2-135m-instruct")
    theirs, ours = GGUFReader(path), _Reader(path)
    assert set(theirs.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"} == set(ours.fields)
    f = GGUFFile(path)
    for key in ours.fields:
        assert theirs.fields[key].contents() == f.get(key), key
    assert len(f.get("tokenizer.ggml.tokens")) == 49152 and f.get("no.such.key", 7) == 7
    assert [t.name for t in theirs.tensors] == [t.name for t in ours.tensors]
    for a, b in zip(theirs.tensors, ours.tensors):
        assert (a.tensor_type, list(a.shape), int(a.data_offset), int(a.n_bytes)) == \
            (b.tensor_type, list(b.shape), b.data_offset, b.n_bytes), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf is not a readable GGUF file .*past the end of the file"):
        GGUFFile(tmp_path / "cut.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:4096])
    with pytest.raises(ValueError, match="magic.gguf is not a readable GGUF file .*not a little-endian GGUF"):
        GGUFFile(tmp_path / "magic.gguf")


def test_our_gguf_reader_reads_every_metadata_type_as_gguf_py_does(tmp_path):
    """A file gguf-py's writer makes with every metadata value type (integers of each width and sign, floats, bools,
    strings, arrays of numbers, of strings and of arrays), a custom alignment, and float and quantized tensors: our
    reader gives gguf-py's values, tensor table and bytes."""
    import gguf
    import numpy as np

    from lookahead.models.gguf import _Array, _Reader

    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 200), w.add_int8("t.i8", -100), w.add_uint16("t.u16", 60000), w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000), w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 2 ** 63 + 5), w.add_int64("t.i64", -(2 ** 62)), w.add_float32("t.f32", 1.5)
    w.add_float64("t.f64", -2.25), w.add_bool("t.bool", True), w.add_string("t.str", "héllo")
    w.add_array("t.ints", [1, -2, 3]), w.add_array("t.floats", [0.5, 1.5]), w.add_array("t.strs", ["a", "", "ç"])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("f16", np.arange(8, dtype=np.float16).reshape(2, 4))
    q8 = np.random.default_rng(0).integers(0, 255, (4, 34), dtype=np.uint8)
    w.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # 4 rows of one block (32 elements)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    theirs, ours = gguf.GGUFReader(path), _Reader(path)
    for key, value in ours.fields.items():
        if key != "t.nested":  # gguf-py flattens an array of arrays ([1, 2, 3]); ours keeps them apart
            assert theirs.fields[key].contents() == (value.contents() if isinstance(value, _Array) else value), key
    assert set(theirs.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"} == set(ours.fields)
    assert ours.fields["t.u64"] == 2 ** 63 + 5 and ours.fields["t.nested"].contents() == [[1, 2], [3]]
    for a, b in zip(theirs.tensors, ours.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape), int(a.data_offset), int(a.n_bytes)) == \
            (b.name, b.tensor_type, list(b.shape), b.data_offset, b.n_bytes)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data))
    assert ours.tensors[0].data_offset % 64 == 0


def test_quantization_none_and_an_explicit_dtype_keep_the_dequantized_path():
    for kwargs in ({"quantization": None}, {"dtype": torch.float32}):
        m = LlamaForLookahead.from_pretrained("smollm2-135m-instruct", **kwargs)
        assert m.tok_embeddings.weight.dtype.is_floating_point and "dequantized" in describe(m)
    with pytest.raises(ValueError, match="quantization must be"):
        LlamaForLookahead.from_pretrained("smollm2-135m-instruct", quantization="q4")


def test_logits_are_close_to_the_dequantized_model(tokenizer):
    """fp32 activations on both sides: the only difference is the Q8 rounding of the activations."""
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    q = LlamaForLookahead.from_pretrained("smollm2-135m-instruct", dtype=torch.float32, quantization="gguf")
    d = LlamaForLookahead.from_pretrained("smollm2-135m-instruct", dtype=torch.float32)
    with torch.inference_mode():
        lq, ld = q(ids).logits[0], d(ids).logits[0]
    agree = (lq.argmax(-1) == ld.argmax(-1)).float().mean().item()
    diff = (lq - ld).abs().max().item()
    print(f"top-1 agreement {agree:.3f} over {ids.shape[1]} tokens, max |logit diff| {diff:.3f}")
    assert agree >= 0.9 and diff < 0.1 * ld.abs().max().item()


def test_verify_logits_equal_one_token_logits_on_the_quantized_model(quantized):
    check_tree_step_equals_one_token_steps(quantized, [37, 5], 9, seed=1)


def quantized_tiny(kinds: dict[str, str], dtype: torch.dtype, seed: int = 0, repack: bool = False) -> LlamaForLookahead:
    """A 2-layer Llama (dim 256, GQA 4/2 of 64, intermediate 256, vocab 97) whose projections are random blocks of
    the given formats: kinds["q"], ["k"], ["v"], ["gate"], ["up"], ["o"], ["down"], ["embed"]. Neighbouring parts
    of q/k/v or gate/up of one format are fused, as load_quantized does (parts back to back in the file, or
    repacked together); parts of different formats make a SplitLinear (e.g. [q and k, v]).
    repack: the linear layers' weights in quant_repack's layouts, as load_quantized runs them (the
    embedding keeps its blocks; the head, tied, is then a repacked copy of them where the vocabulary allows)."""
    hf = dict(model_type="llama", vocab_size=97, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
              rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=None)
    cfg = LlamaForLookahead.config_from_hf(hf)
    cfg.rope_interleaved = True
    model = LlamaForLookahead(cfg).eval().to(dtype)
    seeds = iter(range(seed * 1000, seed * 1000 + 1000))

    def blocks(kind: str, N: int) -> torch.Tensor:
        w = random_weight(kinds[kind], N, 256, next(seeds))
        return repacked(w) if repack and kind != "embed" else w

    def projection(parts: list[tuple[str, int]]):
        groups: list[list[torch.Tensor]] = []
        for i, (k, n) in enumerate(parts):
            w = blocks(k, n)
            if i and kinds[k] == kinds[parts[i - 1][0]]:
                groups[-1].append(w)
            else:
                groups.append([w])
        ws = [torch.cat(g) for g in groups]
        return ws[0] if len(ws) == 1 else SplitLinear(ws)

    with torch.no_grad():
        model.tok_embeddings = QuantEmbedding(torch.nn.Parameter(blocks("embed", 97), requires_grad=False), dtype)
        model.output.weight = model.tok_embeddings.weight
        for layer in model.layers:
            for module, name, parts in ((layer.attention, "wqkv", [("q", 256), ("k", 128), ("v", 128)]),
                                        (layer.feed_forward, "w13", [("gate", 256), ("up", 256)])):
                p = projection(parts)
                if isinstance(p, SplitLinear):
                    setattr(module, name, p)
                else:
                    getattr(module, name).weight = torch.nn.Parameter(p, requires_grad=False)
            layer.attention.wo.weight = torch.nn.Parameter(blocks("o", 256), requires_grad=False)
            layer.feed_forward.w2.weight = torch.nn.Parameter(blocks("down", 256), requires_grad=False)
    model._weights_list = None
    return model


def every(kind: str) -> dict[str, str]:
    return dict.fromkeys(["q", "k", "v", "gate", "up", "o", "down", "embed"], kind)


# Q4_K_M's mix: attn_v and ffn_down Q6_K, the rest Q4_K (so q/k/v and gate/up split by type)
Q4_K_M = dict(every("Q4_K"), v="Q6_K", down="Q6_K", embed="Q6_K", up="Q5_K")
Q4_K_M_3 = dict(Q4_K_M, k="Q5_K")  # q, k and v of three types: three parts
LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # the 32-element formats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kinds,repack", [(every(k), False) for k in FORMATS] + [(Q4_K_M, False), (Q4_K_M, True)] +
                         [(Q4_K_M_3, True)] + [(every(k), True) for k in LEGACY + ("Q3_K", "Q5_K")],
                         ids=list(FORMATS) + ["mixed", "mixed-repacked", "mixed-3-parts"] +
                         [f"{k}-repacked" for k in LEGACY + ("Q3_K", "Q5_K")])
def test_every_format_is_exact_along_every_path_of_random_trees(kinds, repack, dtype):
    model = quantized_tiny(kinds, dtype, repack=repack)
    qkv = model.layers[0].attention.wqkv
    assert len([qkv.weight, *getattr(qkv, "rest", [])]) == len({kinds["q"], kinds["k"], kinds["v"]})
    if repack:
        assert model.layers[0].feed_forward.w2.weight.shape[-1] == REPACKED[kinds["down"]]  # e.g. Q6_K x8
    with torch.inference_mode():
        logits = model.verify(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), model.kv_cache(1, 8), None)
    assert torch.isfinite(logits).all() and logits.dtype == dtype
    check_tree_step_equals_one_token_steps(model, [37, 0, 5], 13, seed=2)


def test_to_a_dtype_changes_the_activations_and_keeps_the_blocks():
    model = quantized_tiny(every("Q4_0"), torch.bfloat16).to(torch.float32)
    assert model.dtype == torch.float32 and model.tok_embeddings.weight.dtype == torch.uint8
    with torch.inference_mode():
        logits = model.verify(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), model.kv_cache(1, 4), None)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.slow
def test_lookahead_equals_plain_greedy_on_the_quantized_model(quantized, tokenizer):
    from lookahead.data import encode_prompt

    prompts = ["Write a Python function that returns the n-th Fibonacci number, with a docstring.",
               "Repeat this list back to me: apples, pears, plums, apples, pears, plums.",
               "Explain in three sentences why the sky is blue."]
    accepted = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt, True)
        plain = quantized.generate(ids, max_new_tokens=48, lookahead=False)
        out = quantized.generate(ids, max_new_tokens=48, return_dict_in_generate=True)
        assert torch.equal(out.sequences, plain), prompt
        accepted.append(out.stats.accepted_per_step)
    assert max(accepted) > 1.0  # drafts were really verified and accepted


@pytest.mark.slow
def test_the_avx2_path_is_exact_on_quantized_models_too():
    """Built for an AVX2 host (maddubs/madd, no VNNI) in a fresh process: the same bitwise checks."""
    root = Path(__file__).resolve().parents[2]
    code = ("import torch, tests.models.test_gguf_native as t\n"
            "from lookahead.kernels import cpu\n"
            "assert cpu.available()\n"
            "for kinds, repack in ((t.Q4_K_M, False), (t.Q4_K_M, True), (t.every('Q4_1'), False), "
            "(t.every('Q8_0'), False), (t.every('Q8_0'), True), (t.every('Q5_0'), True), (t.every('Q4_1'), True)):\n"
            "    model = t.quantized_tiny(kinds, torch.float32, repack=repack)\n"
            "    t.check_tree_step_equals_one_token_steps(model, [37, 0], 9, seed=3)\n"
            "print('exact')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "LOOKAHEAD_CPU_ARCH": "x86-64-v3"},
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "exact" in run.stdout, run.stderr[-2000:]
