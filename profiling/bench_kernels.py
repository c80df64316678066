"""GPU microbenchmarks of the three kernels (triton.testing.do_bench_cudagraph, median), bf16.

    python profiling/bench_kernels.py [--out profiling/bench_kernels.md]

tree_attention against SDPA with an explicit [T, S] mask and against causal SDPA over the same KV, for
prefix {512, 4k, 16k, 32k} x T {16, 64} x Llama-2-7B (32 x 128, MHA) and Llama-3-8B (32 q / 8 kv heads)
shapes; achieved bytes/s (K and V of the prefix + tree, read once per kv head) against the copy bandwidth
measured on the same card. accept_longest_path and compact_kv at T = 64, one row.
"""

import argparse
import datetime

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention.bias import causal_lower_right

from lookahead import kernels
from lookahead.drafting.tree import build_draft, pack_ragged
from lookahead.kernels.triton.tree_attention import build_ancestor_bits


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)


def tree_mask(T: int) -> torch.Tensor:
    """[1, T, T] mask of a random tree of T nodes, built as the decode step builds it."""
    g = torch.Generator().manual_seed(0)
    parents = [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)]
    return pack_ragged([[]], [build_draft(0, [0] * (T - 1), parents)], "cuda", pad=True).tree.tree_mask[:, :T, :T]


def bench(fn) -> float:
    """Median milliseconds of GPU time: replays of a CUDA graph of fn, so launch overhead is left out."""
    return triton.testing.do_bench_cudagraph(fn, return_mode="median")


def bench_attention(prefix: int, T: int, hq: int, hkv: int, D: int = 128):
    dtype = torch.bfloat16
    S = prefix + T
    q = torch.randn(1, T, hq, D, device="cuda", dtype=dtype)
    k = torch.randn(1, hkv, S, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    lens = torch.tensor([prefix], device="cuda")
    mask = tree_mask(T)
    bits = kernels.ancestor_bits(mask)  # packed once per step by the model, shared by its layers
    ours = bench(lambda: kernels.tree_attention(q, k, v, lens, mask, ancestor_bits=bits))
    full = torch.ones(T, S, dtype=torch.bool, device="cuda")
    full[:, prefix:] = mask[0]
    qh, kh, vh = q.transpose(1, 2), k, v
    masked = bench(lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=full, enable_gqa=hq != hkv))
    # the same KV without a tree: causal aligned to the bottom right (each node sees the prefix and the nodes
    # before it); SDPA picks its fused kernel for this mask type
    causal = bench(lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(T, S),
                                                          enable_gqa=hq != hkv))
    bytes_read = 2 * hkv * S * D * 2 + 2 * T * hq * D * 2
    return ours, masked, causal, bytes_read / (ours * 1e-3)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    bw = copy_bandwidth()
    lines = [f"{torch.cuda.get_device_name()} — {datetime.date.today()} — copy bandwidth {bw / 1e9:.0f} GB/s", "",
             "GPU time per call (median of CUDA-graph replays). causal SDPA: the same KV under a bottom-right causal "
             "mask (no tree).", "",
             "| shape | prefix | T | tree_attention us | SDPA+mask us | causal SDPA us | GB/s | % of copy |",
             "|---|---|---|---|---|---|---|---|"]
    for name, hq, hkv in (("llama2-7b 32x128", 32, 32), ("llama3-8b 32q/8kv", 32, 8)):
        for prefix in (512, 4096, 16384, 32768):
            for T in (16, 64):
                ours, masked, causal, rate = bench_attention(prefix, T, hq, hkv)
                lines.append(f"| {name} | {prefix} | {T} | {ours * 1e3:.1f} | {masked * 1e3:.1f} | "
                             f"{causal * 1e3:.1f} | {rate / 1e9:.0f} | {100 * rate / bw:.0f}% |")
    T = 64
    tokens = torch.randint(0, 100, (1, T), device="cuda")
    parents = torch.cat([torch.tensor([[-1]]), torch.arange(T - 1)[None]], 1).cuda()
    acc = bench(lambda: kernels.accept_longest_path(tokens, parents, tokens))
    cache = torch.randn(32, 2, 1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    path = torch.arange(T, device="cuda")[None] * 0 + torch.arange(T, device="cuda")
    path[0, 1:] += 1
    path[0, -1] = -1
    num = torch.tensor([T - 1], device="cuda")
    lens = torch.tensor([1000], device="cuda")
    comp = bench(lambda: kernels.compact_kv(cache, lens, path, num))
    mask64 = tree_mask(T)
    bits = bench(lambda: build_ancestor_bits(mask64))
    lines += ["", f"accept_longest_path T=64: {acc * 1e3:.1f} us; compact_kv T=64 (32 layers x 8 kv heads x 128): "
              f"{comp * 1e3:.1f} us; ancestor bits: {bits * 1e3:.1f} us"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        open(args.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()
