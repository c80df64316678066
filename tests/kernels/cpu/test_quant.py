"""The quantized CPU ops (lookahead/kernels/cpu/quant.cpp) on every GGUF block format they read: dequantization equals
gguf-py's bit for bit, a row's output never depends on the other rows, the thread count or the ISA path, and the
integer kernels stay within the Q8 activation rounding of the fp32 reference."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lookahead.kernels import cpu as cpu_ops

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="the C++ CPU ops could not be built here")

# name -> (elements per block, bytes per block, offsets of the fp16 scales in a block)
FORMATS = {
    "Q8_0": (32, 34, (0,)), "Q4_0": (32, 18, (0,)), "Q4_1": (32, 20, (0, 2)), "Q5_0": (32, 22, (0,)),
    "Q5_1": (32, 24, (0, 2)), "Q3_K": (256, 110, (108,)), "Q4_K": (256, 144, (0, 2)), "Q5_K": (256, 176, (0, 2)),
    "Q6_K": (256, 210, (208,)),
}
# quant_repack's layouts: format -> bytes of a unit of 8 outputs x 256 elements (K-quants) or 64 (the others)
REPACKED = {"Q3_K": 912, "Q4_K": 1184, "Q5_K": 1440, "Q6_K": 1680, "Q8_0": 544, "Q4_0": 288, "Q4_1": 320,
            "Q5_0": 352, "Q5_1": 384}


def random_weight(name: str, N: int, K: int, seed: int) -> torch.Tensor:
    """uint8 [N, K / elems, bytes] of random valid blocks: random quants and scale bytes, sane fp16 scales."""
    elems, nbytes, scales = FORMATS[name]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(N, K // elems, nbytes), dtype=np.uint8)
    for off in scales:
        d = rng.uniform(-0.02 if off == 2 else 0.002, 0.02, size=(N, K // elems)).astype(np.float16)
        blocks[..., off:off + 2] = d.view(np.uint8).reshape(N, K // elems, 2)
    return torch.from_numpy(blocks)


def reference_dequant(name: str, w: torch.Tensor) -> torch.Tensor:
    """gguf-py's dequantize of the same bytes -> fp32 [N, K]."""
    qtype = gguf.GGMLQuantizationType[name]
    return torch.from_numpy(gguf.quants.dequantize(w.reshape(w.shape[0], -1).numpy(), qtype).copy())


def dequant(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.lookahead.quant_embedding(w, torch.arange(w.shape[0]), torch.float32)


@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_equals_gguf_py_bit_for_bit(name):
    elems = FORMATS[name][0]
    w = random_weight(name, 13, 3 * elems, seed=1)
    assert torch.equal(dequant(w), reference_dequant(name, w))
    ids = torch.tensor([[4, 0], [12, 4]])
    rows = torch.ops.lookahead.quant_embedding(w, ids, torch.bfloat16)
    assert rows.shape == (2, 2, 3 * elems) and rows.dtype == torch.bfloat16
    assert torch.equal(rows, reference_dequant(name, w)[ids].to(torch.bfloat16))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_dequantize_of_gguf_py_quantized_weights(name):
    """Blocks written by gguf-py's own quantizer (the real value distribution, not random bytes)."""
    x = np.random.default_rng(2).normal(size=(7, 64)).astype(np.float32)
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
    w = torch.from_numpy(raw.reshape(7, 2, -1).copy())
    assert torch.equal(dequant(w), reference_dequant(name, w))


def rows_alone(x: torch.Tensor, w: torch.Tensor, bias, firsts, singles) -> torch.Tensor:
    """quant_linear(x, w, bias), checked to give every row the bits it gets in the first M rows (M in firsts), alone
    (the rows in singles) and on one thread."""
    full = torch.ops.lookahead.quant_linear(x, w, bias)
    for M in firsts:
        assert torch.equal(torch.ops.lookahead.quant_linear(x[:M], w, bias), full[:M]), M
    for m in singles:
        assert torch.equal(torch.ops.lookahead.quant_linear(x[m:m + 1], w, bias), full[m:m + 1]), m
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.lookahead.quant_linear(x, w, bias), full)
    finally:
        torch.set_num_threads(threads)
    return full


def error_bound(x: torch.Tensor, w_deq: torch.Tensor, group: int) -> torch.Tensor:
    """|y - x @ w.T| bound [M, N]: each activation is rounded to its group's step amax / 127 (error <= half a
    step), plus fp32 rounding of the sums."""
    xf = x.float()
    amax = xf.abs().reshape(xf.shape[0], -1, group).amax(-1)
    step = (amax / 127).repeat_interleave(group, dim=1)  # (M, K)
    return w_deq.abs() @ (step / 2).T * 1.001 + 1e-5 * (w_deq.abs() @ xf.abs().T) + 1e-6  # (N, M)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FORMATS)
def test_quant_linear_is_row_invariant_and_close_to_the_reference(name, dtype):
    elems = FORMATS[name][0]
    K, N = 2 * max(elems, 128), 37  # odd N: a tail of w rows
    w = random_weight(name, N, K, seed=3)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(5)).to(dtype)
    x = torch.randn(64, K, generator=torch.Generator().manual_seed(4)).to(dtype)
    full = rows_alone(x, w, bias, firsts=(1, 3, 7, 16), singles=(0, 5, 63))
    assert full.dtype == dtype and full.shape == (64, N)
    assert torch.equal(torch.ops.lookahead.linear(x[None, 9:12], w, bias)[0], full[9:12])  # linear's early branch

    w_deq = reference_dequant(name, w)
    ref = x.float() @ w_deq.T + bias.float()
    group = 256 if elems == 256 else 32
    bound = error_bound(x, w_deq, group).T + (ref.abs() * 2 ** -8 if dtype == torch.bfloat16 else 0)
    err = (full.float() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}, bound there {bound[err == err.max()][0]:.3g}"
    assert err.max() > 0  # the activations are really quantized (an fp32 path would not err at all)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", REPACKED)
def test_repacked_linear_is_row_invariant_and_agrees_with_the_file_layout(name, dtype):
    """quant_repack's layout (8 outputs per int32 lane set) runs the same integer dots as the file's blocks, so its
    outputs equal the file layout's up to the order of the fp32 block sums (Q4_1 and Q5_1: the same order, so the
    same bits); each row stays alone."""
    K, N = 1024, 40
    w = random_weight(name, N, K, seed=8)
    packed = torch.ops.lookahead_cpu.quant_repack(w)
    unit = 256 if FORMATS[name][0] == 256 else 64
    assert packed.shape == (N // 8, K // unit, REPACKED[name])
    bias = torch.randn(N, generator=torch.Generator().manual_seed(5)).to(dtype)
    x = torch.randn(37, K, generator=torch.Generator().manual_seed(9)).to(dtype)
    full = rows_alone(x, packed, bias, firsts=(1, 2, 3, 4, 5, 7, 8, 9, 16), singles=(0, 6, 36))  # every row tile
    assert full.dtype == dtype and full.shape == (37, N)
    file_layout = torch.ops.lookahead.quant_linear(x.float(), w, bias.float())
    ours = torch.ops.lookahead.quant_linear(x.float(), packed, bias.float())
    assert (ours - file_layout).abs().max() <= 1e-5 * file_layout.abs().max()
    if name in ("Q4_1", "Q5_1"):
        assert torch.equal(ours, file_layout)
        assert torch.equal(full, torch.ops.lookahead.quant_linear(x, w, bias))
    w_deq = reference_dequant(name, w)
    ref = x.float() @ w_deq.T + bias.float()
    bound = error_bound(x, w_deq, FORMATS[name][0]).T + (ref.abs() * 2 ** -8 if dtype == torch.bfloat16 else 0)
    assert ((full.float() - ref).abs() <= bound).all()


def test_bad_weights_are_refused_with_a_clear_message():
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="no block format of 19 bytes"):
        torch.ops.lookahead.quant_linear(x, torch.zeros(3, 2, 19, dtype=torch.uint8), None)
    with pytest.raises(RuntimeError, match="K = 32"):
        torch.ops.lookahead.quant_linear(x, torch.zeros(3, 1, 18, dtype=torch.uint8), None)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.lookahead.quant_embedding(torch.zeros(3, 1, 18, dtype=torch.uint8), torch.tensor([3]),
                                            torch.float32)
    with pytest.raises(RuntimeError, match="tiles of 8, got 12 rows"):
        torch.ops.lookahead_cpu.quant_repack(random_weight("Q4_K", 12, 256, seed=1))
    with pytest.raises(RuntimeError, match="pairs of blocks .64 elements., got 3 blocks"):
        torch.ops.lookahead_cpu.quant_repack(random_weight("Q4_1", 8, 96, seed=1))
    with pytest.raises(RuntimeError, match="repacked, got Q8_0 x8"):
        torch.ops.lookahead_cpu.quant_repack(torch.ops.lookahead_cpu.quant_repack(random_weight("Q8_0", 8, 64, 1)))
    packed = torch.ops.lookahead_cpu.quant_repack(random_weight("Q6_K", 8, 256, seed=1))
    with pytest.raises(RuntimeError, match="serves linear layers only"):
        torch.ops.lookahead.quant_embedding(packed, torch.tensor([0]), torch.float32)


def outputs(seed: int = 7) -> dict[str, torch.Tensor]:
    """Every format's quant_linear on fixed inputs, in fp32 and bf16 (compared across ISA builds)."""
    out = {}
    for name, (elems, _, _) in FORMATS.items():
        K = 2 * max(elems, 128)
        w = random_weight(name, 21, K, seed)
        x = torch.randn(11, K, generator=torch.Generator().manual_seed(seed))
        # the activations' quantization at its edges: a row of zeros; one whose every group of 32 holds 127, so
        # 127 / amax is 1 and the ties k + 0.5 round to even; one with a group of zeros and -0.0
        x[3] = 0.0
        x[5] = (torch.arange(K) % 64 - 32 + 0.5).masked_fill(torch.arange(K) % 32 == 7, 127.0)
        x[6, :32], x[6, 40] = 0.0, -0.0
        for dtype in (torch.float32, torch.bfloat16):
            y = torch.ops.lookahead.quant_linear(x.to(dtype), w, None)
            for m in (0, 3, 4, 5, 6, 10):  # rows alone: the same bits on this ISA path too
                assert torch.equal(torch.ops.lookahead.quant_linear(x[m:m + 1].to(dtype), w, None), y[m:m + 1])
            out[f"{name}-{dtype}"] = y
            if name in REPACKED:  # quant_repack's layout; 24 outputs: three tiles of 8
                packed = torch.ops.lookahead_cpu.quant_repack(random_weight(name, 24, K, seed))
                y = torch.ops.lookahead.quant_linear(x.to(dtype), packed, None)
                for m in (0, 3, 4, 5, 6, 10):
                    assert torch.equal(torch.ops.lookahead.quant_linear(x[m:m + 1].to(dtype), packed, None), y[m:m + 1])
                out[f"{name} x8-{dtype}"] = y
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["x86-64-v4", "x86-64-v3", "x86-64-v2"],
                         ids=["avx512-without-vnni", "avx2", "scalar"])
def test_every_isa_path_gives_the_same_bits(arch, tmp_path):
    """The ops built for AVX-512 without VNNI and for AVX2 (maddubs/madd), and without AVX2 (the portable C++ path),
    in fresh processes: each is row-invariant, and each gives this host's (AVX512-VNNI here) bits exactly."""
    root = Path(__file__).resolve().parents[3]
    code = ("import torch, tests.kernels.cpu.test_quant as t\n"
            "from lookahead.kernels import cpu\n"
            "assert cpu.available()\n"
            f"torch.save(t.outputs(), {str(tmp_path / 'out.pt')!r})\n")
    env = {**os.environ, "LOOKAHEAD_CPU_ARCH": arch}
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs, ours = torch.load(tmp_path / "out.pt"), outputs()
    for key, y in ours.items():
        assert torch.equal(theirs[key], y), key
