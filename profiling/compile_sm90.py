"""Compile the exact path's Triton kernels for an H100 (sm_90) on a machine without a GPU.

The interpreter the CPU tests use accepts code the GPU compiler refuses (types, layouts); this runs the whole
compiler (TTIR -> PTX -> cubin, ptxas from the triton wheel) for the variants the exact mode launches, so a
session without a GPU still learns whether they build. Written against Triton 3.9's ASTSource API.

    python profiling/compile_sm90.py      # one line per kernel variant, non-zero exit on the first failure
"""

from __future__ import annotations

import importlib
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def build(jitfn, types: dict[str, str], constexprs: dict, **options) -> None:
    names = jitfn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    src = ASTSource(fn=jitfn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=TARGET, options=options)
    shown = {k: v for k, v in constexprs.items() if k in ("EXACT", "CHAIN", "SPLITS", "BLOCK_N", "HAS_BIAS")}
    print(f"ok {jitfn.__name__} {types.get('x_ptr', types.get('q_ptr'))} {shown}: "
          f"{len(kernel.asm['cubin'])} bytes of sm_90 code, {time.perf_counter() - t0:.1f} s", flush=True)


def main() -> None:
    linear = importlib.import_module("lookahead.kernels.triton.invariant_linear")
    for dt in ("bf16", "fp16", "fp32"):
        for block_n in (32, 64):
            build(linear._invariant_linear_kernel, {p: f"*{dt}" for p in ("x_ptr", "w_ptr", "bias_ptr", "out_ptr")},
                  dict(HAS_BIAS=True, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=64 if dt == "fp32" else 128,
                       PRECISION="ieee" if dt == "fp32" else "tf32"), num_warps=4, num_stages=4, enable_fp_fusion=False)
    norm = importlib.import_module("lookahead.kernels.triton.rms_norm")
    build(norm._rms_norm_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "eps": "fp32"},
          dict(BLOCK_D=1024), num_warps=4, enable_fp_fusion=False)
    attention = importlib.import_module("lookahead.kernels.triton.tree_attention")
    for chain in (True, False):
        for splits in (1, 4):
            types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "lens_ptr": "*i64", "bits_ptr": "*i64",
                     "out_ptr": "*bf16" if splits == 1 else "*fp32", "ml_ptr": "*fp32", "sm_scale_log2e": "fp32"}
            build(attention._tree_attention_kernel, types,
                  dict(GROUP=4, SPLITS=splits, BLOCK_M=16, BLOCK_N=64, D=128, HEAD_DIM=128, CHAIN=chain,
                       PRECISION="tf32", EXACT=True, BLOCK_T=64), num_warps=4, num_stages=3, enable_fp_fusion=False)


if __name__ == "__main__":
    main()
