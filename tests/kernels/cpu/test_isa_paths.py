"""The C++ CPU ops on each x86 code path this host can build: AVX2 + FMA (-march=x86-64-v3: AMD Zen 2/3, Intel
client CPUs), AVX-512 without BF16 (x86-64-v4: Skylake-SP to Ice Lake) and the host's own (native). Each path is
built and run in a fresh process with LOOKAHEAD_CPU_ARCH set (the build is cached by source hash), and must keep
the exactness contract: a row's bits never depend on the other rows of a call, and lookahead == plain greedy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import root_paths

ROOT = Path(__file__).resolve().parents[3]
# x86-64-v2 (no AVX2/FMA) compiles the portable path, the one ARM hosts get: checked here for its bits only
# (std::fma is a library call without FMA, too slow for the end-to-end test)
OP_ARCHS = pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64-v4", "native", "x86-64-v2"],
                                   ids=["avx2", "avx512-without-bf16", "native", "portable"])
EXPECTED_PATH = {"x86-64-v3": "avx2", "x86-64-v4": "avx512", "x86-64-v2": "portable"}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def run_on_path(arch: str, code: str) -> str:
    """Run code in a fresh interpreter whose C++ ops are built for arch (an x86-64-vN one only on an x86 host that
    runs it); its stdout (the test fails on an error)."""
    if arch != "native" and not _x86_64_v4_host():
        pytest.skip("this host cannot run x86-64-v3/v4 code (not x86-64 with AVX-512)")
    env = {k: v for k, v in os.environ.items() if k not in ("LOOKAHEAD_KERNELS", "LOOKAHEAD_CHECKS")}
    env.update(LOOKAHEAD_CPU_ARCH=arch, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _x86_64_v4_host() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"))


def _same_rows(full: torch.Tensor, part: torch.Tensor, what: str) -> None:
    assert torch.equal(full.view(torch.int8) if full.dtype != torch.bool else full,
                       part.view(torch.int8) if part.dtype != torch.bool else part), what


def check_linear() -> None:
    """Row i of a call with M rows == row i alone == row i among other rows; and close to fp64's x @ w.T + b. 140
    rows take the many-rows kernel where a path has one (the AVX2 path from 32 rows: linear.cpp, PANEL_MIN_ROWS);
    a row of -0s and non-finite values included."""
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for N, K in ((37, 100), (64, 576), (5, 17), (130, 33), (7, 8)):
            x = torch.randn(140, K, generator=g).to(dtype)
            x[20], x[21, 1], x[22, 0] = -0.0, float("inf"), float("nan")
            w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
            b = torch.randn(N, generator=g).to(dtype)
            for bias in (b, None):
                full = torch.ops.lookahead.linear(x, w, bias)  # full and partial tiles / panels on every path
                ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
                finite = torch.ones(140, dtype=torch.bool)
                finite[21:23] = False
                torch.testing.assert_close(full[finite].double(), ref[finite], atol=TOL[dtype] * 4, rtol=TOL[dtype])
                for M in (1, 2, 3, 4, 5, 7, 8, 9, 16, 23, 31, 32, 33, 129):
                    _same_rows(full[:M], torch.ops.lookahead.linear(x[:M].clone(), w, bias), f"{dtype} {N}x{K} M={M}")
                others = torch.randn(6, K, generator=g).to(dtype)
                others[4] = x[11]
                _same_rows(full[11], torch.ops.lookahead.linear(others, w, bias)[4], f"{dtype} {N}x{K} row 11")


def check_norms() -> None:
    """rms_norm, add_rms_norm_ and silu_mul: each row's bits alone == among 13 rows, odd widths included."""
    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        for D in (576, 100, 17, 8, 3):
            x = torch.randn(13, D, generator=g).to(dtype)
            h = torch.randn(13, D, generator=g).to(dtype)
            w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
            full = torch.ops.lookahead.rms_norm(x, w, 1e-5)
            ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)) * w.double()
            torch.testing.assert_close(full.double(), ref, atol=TOL[dtype] * 8, rtol=TOL[dtype] * 2)
            summed = x.clone()
            full_add = torch.ops.lookahead.add_rms_norm_(summed, h, w, 1e-5)
            torch.testing.assert_close(summed.double(), x.double() + h.double(), atol=TOL[dtype], rtol=TOL[dtype])
            gate_up = torch.randn(13, 2 * D, generator=g).mul(4).to(dtype)
            silu = torch.ops.lookahead.silu_mul(gate_up)
            gd, ud = gate_up.double().chunk(2, -1)
            torch.testing.assert_close(silu.double(), gd * torch.sigmoid(gd) * ud, atol=TOL[dtype] * 16,
                                       rtol=TOL[dtype] * 2)
            for i in (0, 5, 12):
                _same_rows(full[i], torch.ops.lookahead.rms_norm(x[i:i + 1].clone(), w, 1e-5)[0], f"rms {dtype} {D}")
                one = x[i:i + 1].clone()
                _same_rows(full_add[i], torch.ops.lookahead.add_rms_norm_(one, h[i:i + 1].clone(), w, 1e-5)[0],
                           f"add_rms {dtype} {D}")
                _same_rows(summed[i], one[0], f"residual {dtype} {D}")
                _same_rows(silu[i], torch.ops.lookahead.silu_mul(gate_up[i:i + 1].clone())[0], f"silu {dtype} {D}")


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """transformers' RoPE in x's dtype: x * cos + rotate(x) * sin, each product rounded to the dtype, on the first
    R = cos.shape[-1] dims of each head (x [..., H, D], cos/sin [..., R]); the rest passes through."""
    R = cos.shape[-1]
    r = x[..., :R]
    if interleaved:  # pairs (2i, 2i + 1): (-x[2i + 1], x[2i])
        rot = torch.stack((-r[..., 1::2], r[..., 0::2]), dim=-1).flatten(-2)
    else:
        rot = torch.cat((-r[..., R // 2:], r[..., :R // 2]), dim=-1)
    return torch.cat((r * cos[..., None, :] + rot * sin[..., None, :], x[..., R:]), dim=-1)


def check_rope() -> None:
    """rope_store: q rotated and k rotated into the cache at each token's slot, v copied, all with transformers'
    rounding bit for bit, in both layouts (halves, pairs), full and partial rotary dims, one token or many."""
    g = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        for D, R, hq, hkv, T in ((64, 64, 9, 3, 1), (64, 64, 9, 3, 8), (128, 64, 4, 2, 5), (40, 24, 2, 1, 3),
                                 (64, 16, 2, 2, 2), (20, 20, 1, 1, 4)):
            for interleaved in (False, True):
                qkv = torch.randn(1, T, (hq + 2 * hkv) * D, generator=g).mul(3).to(dtype)
                angles = torch.rand(1, T, R, generator=g) * 6.3
                cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
                k_cache = torch.zeros(1, hkv, 2 * T + 3, D, dtype=dtype)
                v_cache = torch.zeros_like(k_cache)
                slots = (torch.arange(T) * 2 + 1)[None]
                q = torch.ops.lookahead.rope_store(qkv, cos, sin, k_cache, v_cache, slots, hq, interleaved)
                heads = qkv.view(1, T, hq + 2 * hkv, D)
                what = f"rope {dtype} D={D} R={R} interleaved={interleaved}"
                _same_rows(q, rope_reference(heads[:, :, :hq], cos, sin, interleaved), what + " q")
                k = rope_reference(heads[:, :, hq:hq + hkv], cos, sin, interleaved)  # [1, T, hkv, D]
                _same_rows(k_cache[0][:, slots[0]], k[0].transpose(0, 1), what + " k")
                _same_rows(v_cache[0][:, slots[0]], heads[0, :, hq + hkv:].transpose(0, 1), what + " v")


def check_attention() -> None:
    """A causal chain of T nodes behind L committed keys: node i's output == that of the chain cut after node i
    (its own key sequence, nothing else), for odd head dims and lengths; and close to softmax attention. A random
    tree: each node's output == the node alone behind its path, compacted."""
    g = torch.Generator().manual_seed(2)
    for dtype in DTYPES:
        # GQA: 1 to 8 query heads per KV head; head dims 7 to 128
        for D, L, T, hq, hkv in ((64, 37, 9, 6, 2), (24, 0, 7, 3, 3), (80, 300, 5, 4, 1), (7, 17, 3, 2, 2),
                                 (64, 0, 70, 3, 1), (128, 3, 20, 2, 2), (128, 40, 6, 4, 2), (64, 20, 9, 8, 2),
                                 (7, 17, 3, 4, 2), (100, 33, 4, 4, 2)):
            k = torch.randn(1, hkv, L + T, D, generator=g).to(dtype)
            v = torch.randn(1, hkv, L + T, D, generator=g).to(dtype)
            q = torch.randn(1, T, hq, D, generator=g).to(dtype)
            lens = torch.tensor([L])
            scale = D ** -0.5
            full = torch.ops.lookahead.tree_attention(q, k, v, lens, None, scale)  # [1, T, hq, D]
            kk = k.double().repeat_interleave(hq // hkv, 1)  # [1, hq, L + T, D]
            vv = v.double().repeat_interleave(hq // hkv, 1)
            s = torch.einsum("bthd,bhnd->bhtn", q.double(), kk) * scale
            s = s.masked_fill(torch.arange(L + T)[None, :] > L + torch.arange(T)[:, None], float("-inf"))
            ref = torch.einsum("bhtn,bhnd->bthd", s.softmax(-1), vv)
            torch.testing.assert_close(full.double(), ref, atol=TOL[dtype] * 8, rtol=TOL[dtype] * 2)
            if hq > hkv:  # heads that share a KV head == each head over its own copy of it
                alone = torch.ops.lookahead.tree_attention(q, k.repeat_interleave(hq // hkv, 1).contiguous(),
                                                           v.repeat_interleave(hq // hkv, 1).contiguous(), lens,
                                                           None, scale)
                _same_rows(full, alone, f"attention {dtype} D={D} L={L} heads {hq}/{hkv} against one by one")
            for i in range(T):
                cut = torch.ops.lookahead.tree_attention(q[:, :i + 1].clone(), k, v, lens, None, scale)
                _same_rows(full[0, i], cut[0, i], f"attention {dtype} D={D} L={L} node {i}")
            # the same chain as a ragged step with its mask (how a prompt chunk is prefilled): the same bits
            rows, nodes = torch.zeros(T, dtype=torch.long), torch.arange(T)
            chain = torch.ones(T, T, dtype=torch.bool).tril()
            ragged = torch.ops.lookahead.tree_attention(q[0].clone(), k, v, lens, chain, scale, rows, nodes)
            _same_rows(full[0], ragged, f"attention {dtype} D={D} L={L} ragged chain")
    # a random tree: node i's output == that of node i alone behind its compacted key sequence (the committed keys,
    # then its path root first), as the one-token step that decodes it sees it
    from tests.kernels.cpu.test_exact import random_tree  # here: that module builds the ops when imported
    for dtype in DTYPES:
        for D, L, T, hq, hkv in ((64, 45, 12, 9, 3), (80, 20, 9, 4, 1), (24, 7, 10, 8, 2), (128, 33, 7, 6, 2)):
            paths = root_paths(random_tree(T, g))
            mask = torch.zeros(1, T, T, dtype=torch.bool)
            for i, path in enumerate(paths):
                mask[0, i, path] = True
            k = torch.randn(1, hkv, L + T, D, generator=g).to(dtype)
            v = torch.randn(1, hkv, L + T, D, generator=g).to(dtype)
            q = torch.randn(1, T, hq, D, generator=g).to(dtype)
            full = torch.ops.lookahead.tree_attention(q, k, v, torch.tensor([L]), mask, D ** -0.5)
            for i, path in enumerate(paths):
                keep = list(range(L)) + [L + j for j in path]
                alone = torch.ops.lookahead.tree_attention(q[:, i:i + 1].clone(), k[:, :, keep].contiguous(),
                                                           v[:, :, keep].contiguous(), torch.tensor([len(keep) - 1]),
                                                           None, D ** -0.5)
                _same_rows(full[0, i], alone[0, 0], f"attention {dtype} D={D} L={L} tree node {i}")


def logit_rows(dtype: torch.dtype, V: int, g: torch.Generator) -> torch.Tensor:
    """Six rows of V logits for the selection ops: random; rounded (many ties); zeros and one -0.0; two tied +inf and
    a -inf; two NaNs; bf16-rounded values (ties near the top)."""
    x = (torch.randn(6, V, generator=g) * 4).to(dtype)
    x[1] = x[1].round()
    x[2] = 0.0
    x[2, V // 2] = -0.0
    x[3, 0] = float("-inf")
    x[3, V // 3] = float("inf")
    x[3, V - 1] = float("inf")
    x[4, V - 1] = float("nan")
    x[4, V // 2] = float("nan")
    x[5] = x[5].to(torch.bfloat16).to(dtype)
    return x


def check_argmax() -> None:
    """The argmax op == torch.argmax in every dtype (`logit_rows`: ties give the first index, the first NaN wins),
    rows of lengths around the 32-wide vector loop, one element, strided inputs."""
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for V in (1, 7, 31, 32, 33, 100, 49152):
            x = logit_rows(dtype, V, g)
            for rows in (x, x[:1], x[1:2].expand(3, V), x[:, None]):  # a strided input (expand) is copied first
                want = rows.float().argmax(-1)
                got = torch.ops.lookahead.argmax(rows)
                assert got.dtype == torch.long and torch.equal(got, want), (dtype, V, got, want)
    only_neg_inf = torch.full((1, 40), float("-inf"))
    assert int(torch.ops.lookahead.argmax(only_neg_inf)) == 0


def check_top_k() -> None:
    """The top_k_indices op == a stable descending sort's first k indices in every dtype (its documented order:
    equal values by index; a NaN above every number) on `logit_rows`, k from 0 to V, and its values == torch.topk's
    on the rows without NaN."""
    from lookahead.kernels.ops import _top_k_indices_torch

    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for V in (1, 7, 8, 9, 33, 100, 49152):
            x = logit_rows(dtype, V, g)
            for k in sorted({0, 1, min(8, V), min(33, V), min(65, V), V if V < 1000 else 100}):
                got = torch.ops.lookahead.top_k_indices(x, k)
                want = _top_k_indices_torch(x.float(), k)
                assert got.dtype == torch.long and torch.equal(got, want), (dtype, V, k)
                assert torch.equal(x.float().gather(-1, got)[:4], x[:4].float().topk(k, dim=-1).values)


@OP_ARCHS
def test_ops_are_row_invariant_on_each_code_path(arch):
    """linear, rms_norm, add_rms_norm_, silu_mul and tree_attention built for arch: bitwise row-invariant in fp32,
    bf16 and fp16, and close to an fp64 reference (a kernel that is invariant but wrong fails too); rope_store equal
    to transformers' rounding bit for bit; argmax equal to torch's, top_k_indices to a stable sort's. The ops say
    which code path they were built for; cost curves are keyed by it, and dtype="auto" follows it."""
    out = run_on_path(arch, "import torch\n"
                            "from lookahead.kernels import cpu\n"
                            "from lookahead.cost import curve_key\n"
                            "import tests.kernels.cpu.test_exact as e, tests.kernels.cpu.test_isa_paths as t\n"
                            "assert cpu.available()\n"
                            "t.check_linear(); t.check_norms(); t.check_rope(); t.check_attention()\n"
                            "t.check_argmax(); t.check_top_k()\n"
                            "print('row-invariant')\n"
                            "print('path', cpu.code_path(), cpu.auto_dtype()[0], curve_key(e.tiny(torch.float32)))\n")
    assert "row-invariant" in out
    path, auto, key = out.split("path ")[-1].split(" ", 2)
    assert path == EXPECTED_PATH.get(arch, path) and f"cpu_ops={path}" in key
    assert auto == ("torch.float32" if path == "portable" else "torch.bfloat16")


PROMPTS = ("Write a haiku about the sea.", "List the first ten prime numbers, comma separated.",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")


def check_lookahead_equals_plain(dtype: str) -> None:
    """The embedded SmolLM2: greedy lookahead gives the tokens of plain greedy decoding, prompt after prompt."""
    from lookahead import LookaheadConfig
    from lookahead.data import encode_prompt
    from lookahead.models.auto import load_model

    model, tok = load_model("smollm2-135m-instruct", dtype, "cpu")
    accepted = []
    for prompt in PROMPTS + PROMPTS:  # the second round drafts from the first round's text
        ids = encode_prompt(tok, prompt, chat=True)
        plain = model.generate(ids, max_new_tokens=48, lookahead=False)
        # adaptive=False: the drafts verified must not depend on this machine's timing
        ahead = model.generate(ids, max_new_tokens=48, lookahead=LookaheadConfig(adaptive=False, decoding_length=16),
                               return_dict_in_generate=True)
        assert ahead.sequences.tolist() == plain.tolist(), (dtype, prompt)
        accepted.append(ahead.stats.accepted_per_step)
    print("accepted per step", max(accepted))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64-v4"], ids=["avx2", "avx512-without-bf16"])
def test_lookahead_equals_plain_on_each_code_path(arch):
    """End to end on each other host's code path, bf16 and fp32 in one process (one build of the ops): lookahead ==
    plain greedy on SmolLM2, with drafts really accepted. The native path is tests/engine/test_lossless.py's."""
    out = run_on_path(arch, "import torch; torch.set_num_threads(2)\n"
                            "import tests.kernels.cpu.test_isa_paths as t\n"
                            "t.check_lookahead_equals_plain('bf16')\n"
                            "t.check_lookahead_equals_plain('fp32')\n")
    accepted = [float(part.split()[0]) for part in out.split("accepted per step")[1:]]
    assert len(accepted) == 2 and min(accepted) > 1.0
