"""GPU measurements of the exact (batch-invariant) verify step, issue 21 part 3; prints Markdown, appends to --out.

    python profiling/gpu_exact.py gemm        # invariant GEMM vs cuBLAS, M in {1, 8, 16, 64}, SmolLM2 + 7B shapes
    python profiling/gpu_exact.py step        # plain step (T = 1) and T = 64, exact vs default, 7B + SmolLM2 shapes
    python profiling/gpu_exact.py attention   # GQA Llama-3-8B-shape tree attention at prefix >= 4k vs copy bandwidth
    python profiling/gpu_exact.py lossless7b  # random-weight 7B shape, bf16, exact: lookahead == plain on 8 prompts
    python profiling/gpu_exact.py lossless    # SmolLM2 bf16 + fp16, exact: lookahead == plain on 40 x 128 tokens
    python profiling/gpu_exact.py batch       # SmolLM2 bf16, exact: plain vs lookahead, B in {1, 4, 16, 64}
    python profiling/gpu_exact.py ncu_driver  # one exact lookahead generate, for Nsight Compute to watch

--smoke runs a part on CPU with tiny shapes (Triton interpreter, torch timers, the torch path for SmolLM2): it
checks the script, its numbers mean nothing. Kernel timings are CUDA-graph replays of 20 back-to-back calls
(triton.testing.do_bench, median), so launch overhead is out of them as it is out of a graph-replayed step.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

SMOKE = False


def device() -> str:
    return "cpu" if SMOKE else "cuda"


def where() -> str:
    return "CPU smoke run (numbers meaningless)" if SMOKE else f"{torch.cuda.get_device_name()}, {date.today()}"


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def bench(fn, reps: int = 20) -> float:
    """Seconds per call of fn: median replay of a CUDA graph of `reps` calls (one timed call on CPU)."""
    if SMOKE:
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    import triton.testing

    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm the allocator on the capture stream
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return triton.testing.do_bench(graph.replay, return_mode="median") * 1e-3 / reps


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write), the roofline the targets are stated against."""
    n = (1 << 20) if SMOKE else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    return 2 * n / bench(lambda: dst.copy_(src), reps=5)


# ---- shapes ----------------------------------------------------------------------------------------------------

SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True, eos_token_id=2)
LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=2)
TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=2)


def linear_shapes(hf: dict) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of the model's weights (fused qkv and gate/up as our models hold them)."""
    d, i, hd = hf["hidden_size"], hf["intermediate_size"], hf["hidden_size"] // hf["num_attention_heads"]
    return {"wqkv": ((hf["num_attention_heads"] + 2 * hf["num_key_value_heads"]) * hd, d), "wo": (d, d),
            "w13": (2 * i, d), "w2": (d, i), "lm head": (hf["vocab_size"], d)}


def random_model(hf: dict, dtype: torch.dtype):
    """A random-weight LlamaForLookahead of this config, built directly in dtype on the device."""
    from lookahead.models import LlamaForLookahead

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device()):
            model = LlamaForLookahead(LlamaForLookahead.config_from_hf(hf))
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model.eval()


# ---- parts -----------------------------------------------------------------------------------------------------

def gemm(args) -> list[str]:
    from lookahead import kernels
    from lookahead.kernels.triton.invariant_linear import launch, tile_config

    dtype = torch.float32 if SMOKE else torch.bfloat16
    models = {"tiny": TINY} if SMOKE else {"SmolLM2": SMOLLM2, "Llama-2-7B": LLAMA2_7B}
    lines = [f"### Invariant GEMM vs cuBLAS (F.linear), {str(dtype)[6:]}, {where()}", "",
             "us per call (graph replay); ratio = invariant / cuBLAS; rows = a row's bits equal at every M", "",
             "| model | weight (N x K) | M=1 | M=8 | M=16 | M=64 | rows |", "|---|---|---|---|---|---|---|"]
    totals = {}
    for model, hf in models.items():
        tot_inv = {M: 0.0 for M in (1, 8, 16, 64)}
        tot_ref = dict(tot_inv)
        for name, (N, K) in linear_shapes(hf).items():
            w = torch.randn(N, K, device=device(), dtype=dtype) * K ** -0.5
            x = torch.randn(64, K, device=device(), dtype=dtype)
            full = kernels.invariant_linear(x, w)
            same = all(torch.equal(kernels.invariant_linear(x[:M], w), full[:M]) for M in (1, 8, 16))
            cells = []
            for M in (1, 8, 16, 64):
                xm = x[:M].contiguous()
                t_inv, t_ref = bench(lambda: kernels.invariant_linear(xm, w)), bench(lambda: F.linear(xm, w))
                layers = 1 if name == "lm head" else hf["num_hidden_layers"]
                tot_inv[M] += t_inv * layers
                tot_ref[M] += t_ref * layers
                cells.append(f"{t_inv * 1e6:.1f} / {t_ref * 1e6:.1f} ({t_inv / t_ref:.2f}x)")
            lines.append(f"| {model} | {name} {N} x {K} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
        totals[model] = (tot_inv, tot_ref)
    lines += ["", "Sum over one forward's linear layers (each weight shape x its layer count):", ""]
    for model, (inv, ref) in totals.items():
        lines.append(f"- {model}: " + ", ".join(f"M={M}: {inv[M] * 1e3:.3f} ms vs {ref[M] * 1e3:.3f} ms "
                                                 f"({inv[M] / ref[M]:.2f}x)" for M in inv))
    # candidate tiles (a tile may depend on N, K and dtype only): what a retune would choose from
    lines += ["", "Tile sweep on the 7B shapes (us at M=1 / M=64; * = the current tile_config):", ""]
    shapes = linear_shapes(TINY if SMOKE else LLAMA2_7B)
    candidates = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4),
                  (32, 64, 128, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3)]
    for name, (N, K) in shapes.items():
        w = torch.randn(N, K, device=device(), dtype=dtype) * K ** -0.5
        x = torch.randn(64, K, device=device(), dtype=dtype)
        cells = []
        for cfg in candidates[:2] if SMOKE else candidates:
            t1 = bench(lambda: launch(x[:1], w, None, cfg))
            t64 = bench(lambda: launch(x, w, None, cfg))
            star = "*" if cfg == tile_config(N, K, dtype) else ""
            cells.append(f"{cfg}{star}: {t1 * 1e6:.1f} / {t64 * 1e6:.1f}")
        lines.append(f"- {name} {N} x {K}: " + "; ".join(cells))
    return lines


def step_time(model, T: int, prefix: int = 256) -> float:
    """Seconds of one graph-replayed verify step of T chain nodes over `prefix` committed tokens, batch 1."""
    from lookahead.models.cache import KVCache

    cfg = model.config
    cache = KVCache(cfg.n_layers, 1, cfg.n_kv_heads, prefix + T + 8, cfg.head_dim, model.dtype, model.device)
    cache.lens.fill_(prefix)
    tokens = torch.zeros(1, T, dtype=torch.long, device=model.device)
    depths = torch.arange(T, device=model.device)[None]
    with torch.inference_mode():
        return bench(lambda: model.verify(tokens, depths, cache, None), reps=1 if SMOKE else 5)


def step(args) -> list[str]:
    dtype = torch.float32 if SMOKE else torch.bfloat16
    bw = copy_bandwidth()
    lines = [f"### Verify step, exact vs default kernels, {str(dtype)[6:]}, batch 1, 256 committed tokens, "
             f"{where()}", "", f"Copy bandwidth in this run: {bw / 1e12:.2f} TB/s (read + write).", "",
             "| model | T | default ms | exact ms | exact / default | weights / copy bw (roofline) ms | "
             "default % of roofline |", "|---|---|---|---|---|---|---|"]
    for name, hf in ({"tiny": TINY} if SMOKE else {"SmolLM2": SMOLLM2, "Llama-2-7B": LLAMA2_7B}).items():
        model = random_model(hf, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        roofline = weight_bytes / (bw / 2)  # a copy moves each byte twice; a step reads each weight once
        for T in (1, 16, 64):
            model.set_exact(False)
            t_def = step_time(model, T)
            model.set_exact(True)
            t_exact = step_time(model, T)
            lines.append(f"| {name} | {T} | {t_def * 1e3:.3f} | {t_exact * 1e3:.3f} | {t_exact / t_def:.2f}x | "
                         f"{roofline * 1e3:.3f} | {100 * roofline / t_def:.0f}% |")
        del model
        if not SMOKE:
            torch.cuda.empty_cache()
    return lines


def attention(args) -> list[str]:
    from lookahead import kernels

    dtype = torch.float32 if SMOKE else torch.bfloat16
    Hq, Hkv, D = (4, 1, 16) if SMOKE else (32, 8, 128)  # Llama-3-8B: GQA 4
    prefixes = (64,) if SMOKE else (4096, 8192)
    bw = copy_bandwidth()
    lines = [f"### GQA tree attention (Llama-3-8B shape: {Hq} q heads, {Hkv} kv heads, D {D}), {str(dtype)[6:]}, "
             f"batch 1, {where()}", "", f"Copy bandwidth in this run: {bw / 1e12:.2f} TB/s; % = K/V bytes read "
             "/ time / (copy bandwidth / 2)", "", "| prefix | T | default us | default % | exact us | exact % |",
             "|---|---|---|---|---|---|"]
    for P in prefixes:
        for T in (16, 64):
            g = torch.Generator().manual_seed(T)
            q = torch.randn(1, T, Hq, D, generator=g).to(device(), dtype)
            k = torch.randn(1, Hkv, P + T, D, generator=g).to(device(), dtype)
            v = torch.randn(1, Hkv, P + T, D, generator=g).to(device(), dtype)
            lens = torch.tensor([P], device=device())
            parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)]
            mask = torch.zeros(1, T, T, dtype=torch.bool)
            for i in range(T):
                mask[0, i, i] = True
                if i:
                    mask[0, i] |= mask[0, parents[i]]
            mask = mask.to(device())
            bits = kernels.ancestor_bits(mask)
            kv_bytes = 2 * Hkv * (P + T) * D * q.element_size()
            row = []
            for exact in (False, True):
                t = bench(lambda: kernels.tree_attention(q, k, v, lens, mask, ancestor_bits=bits, exact=exact))
                row += [f"{t * 1e6:.1f}", f"{100 * kv_bytes / t / (bw / 2):.0f}%"]
            lines.append(f"| {P} | {T} | " + " | ".join(row) + " |")
    return lines


def compare(model, prompts: list[torch.Tensor], tokens: int, configs) -> tuple[int, list[int], list[float], float,
                                                                                float]:
    """(prompts where lookahead == plain, first divergences, accepted/step, plain seconds, lookahead seconds)."""
    same, diffs, acc, t_plain, t_look = 0, [], [], 0.0, 0.0
    for k, ids in enumerate(prompts):
        kw = dict(max_new_tokens=tokens, eos_token_id=[], return_dict_in_generate=True)
        sync()
        t0 = time.perf_counter()
        plain = model.generate(ids, lookahead=False, **kw).sequences[0].tolist()
        sync()
        t1 = time.perf_counter()
        out = model.generate(ids, lookahead=configs[k % len(configs)], **kw)
        sync()
        t_plain, t_look = t_plain + t1 - t0, t_look + time.perf_counter() - t1
        got = out.sequences[0].tolist()
        acc.append(out.stats.accepted_per_step)
        if got == plain:
            same += 1
        else:
            diffs.append(next(i for i, (a, b) in enumerate(zip(got, plain)) if a != b) - ids.shape[1])
    return same, diffs, acc, t_plain, t_look


def configs(exact: bool):
    from lookahead import LookaheadConfig

    return [LookaheadConfig(layout="hier", exact=exact), LookaheadConfig(layout="par", exact=exact)]


def lossless7b(args) -> list[str]:
    model = random_model(TINY if SMOKE else LLAMA2_7B, torch.float32 if SMOKE else torch.bfloat16)
    model.set_exact(True)  # plain decoding too: lookahead must return exact plain decoding's tokens
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = []
    for _ in range(2 if SMOKE else 8):  # repetitive prompts, so the trie has drafts to verify
        motif = torch.randint(3, vocab, (12,), generator=g)
        prompts.append(torch.cat([motif.repeat(6), torch.randint(3, vocab, (28,), generator=g)])[None].to(device()))
    tokens = 8 if SMOKE else args.tokens
    model.generate(prompts[0], max_new_tokens=4, eos_token_id=[])  # warm-up
    same, diffs, acc, tp, tl = compare(model, prompts, tokens, configs(True))
    return [f"### Random-weight Llama-2-7B shape, {model.dtype}, exact on, {where()}", "",
            f"- lookahead == plain on {same}/{len(prompts)} prompts x {tokens} tokens"
            + (f" (first divergence at new token {sorted(diffs)})" if diffs else "")
            + f"; accepted/step {sum(acc) / len(acc):.2f}; plain {len(prompts) * tokens / tp:.1f} tok/s, "
              f"lookahead {len(prompts) * tokens / tl:.1f} tok/s (wall, whole calls)"]


def smollm2(dtype):
    from transformers import AutoTokenizer

    from lookahead.models import LlamaForLookahead, resolve_checkpoint

    model = LlamaForLookahead.from_pretrained("smollm2-135m-instruct", dtype=dtype, device=device())
    return model, AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"))


def spec_bench_prompts(tok, n: int) -> list[torch.Tensor]:
    from lookahead.data import encode_prompt, spec_bench_first_turns

    return [encode_prompt(tok, text, chat=True).to(device()) for _, text in spec_bench_first_turns(4)[:n]]


def lossless(args) -> list[str]:
    n, tokens = (2, 8) if SMOKE else (40, args.tokens)
    lines = [f"### SmolLM2 lookahead == plain with the exact path on, {n} Spec-Bench prompts x {tokens} new tokens, "
             f"CUDA graphs, {where()}", ""]
    dtypes = (torch.float32,) if SMOKE else (torch.bfloat16, torch.float16)
    for dtype in dtypes:
        model, tok = smollm2(dtype)
        model.set_exact(True)
        model.state.forget_drafting()
        prompts = spec_bench_prompts(tok, n)
        model.generate(prompts[0], max_new_tokens=4)  # warm-up: compile
        same, diffs, acc, tp, tl = compare(model, prompts, tokens, configs(True))
        lines.append(f"- {str(dtype)[6:]}: lookahead == plain on {same}/{n}; accepted/step {sum(acc) / len(acc):.2f}; "
                     f"plain {n * tokens / tp:.0f} tok/s, lookahead {n * tokens / tl:.0f} tok/s (wall, whole calls, "
                     "cold trie at the start)" + (f"; first divergence at new token {sorted(diffs)}" if diffs else ""))
        print(lines[-1], flush=True)  # kept in the log if a later step runs out of time
        if dtype != dtypes[0]:
            continue
        # target: lookahead with the exact path >= 10x transformers greedy (same prompts, same dtype)
        from transformers import AutoModelForCausalLM

        from lookahead.models import resolve_checkpoint

        hf = AutoModelForCausalLM.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"), dtype=dtype).to(
            device()).eval()
        few = prompts[:2 if SMOKE else 5]
        hf.generate(few[0], max_new_tokens=4, do_sample=False)
        sync()
        t0 = time.perf_counter()
        for ids in few:
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                        do_sample=False, pad_token_id=0)
        sync()
        t_hf = time.perf_counter() - t0
        *_, t_look = compare(model, few, tokens, configs(True))  # warm trie now (the 40 prompts above)
        lines.append(f"- {str(dtype)[6:]} vs transformers greedy on {len(few)} of them: transformers "
                     f"{len(few) * tokens / t_hf:.0f} tok/s, lookahead exact {len(few) * tokens / t_look:.0f} tok/s "
                     f"= {t_hf / t_look:.1f}x (warm trie)")
        del hf, model
    return lines


def batch(args) -> list[str]:
    import copy

    from lookahead import LookaheadConfig

    from lookahead.data import encode_prompt, spec_bench_first_turns

    model, tok = smollm2(torch.float32 if SMOKE else torch.bfloat16)
    model.set_exact(True)
    texts = [t for _, t in spec_bench_first_turns(10)]
    tokens = 8 if SMOKE else args.tokens
    for text in texts[-2 if SMOKE else -20:]:  # warm-up split, never measured
        model.generate(encode_prompt(tok, text, chat=True).to(device()), max_new_tokens=tokens)
    warm = copy.deepcopy(model.state.trie)
    tok.padding_side = "left"
    lines = [f"### Batch sweep, SmolLM2 {model.dtype}, exact on, {tokens} new tokens, CUDA graphs, {where()}", "",
             "| B | plain tok/s | lookahead tok/s | speedup | accepted/step | rows identical |", "|---|---|---|---|---|---|"]
    for B in ((1, 2) if SMOKE else (1, 4, 16, 64)):
        rows = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
                for t in (texts * 8)[:B]]
        enc = tok(rows, return_tensors="pt", padding=True, add_special_tokens=False).to(device())
        kw = dict(attention_mask=enc.attention_mask, max_new_tokens=tokens, return_dict_in_generate=True,
                  eos_token_id=[])
        cfg = LookaheadConfig(exact=True)
        model.generate(enc.input_ids, lookahead=False, **kw)  # warm-up: this batch's graphs
        model.trie = copy.deepcopy(warm)
        model.generate(enc.input_ids, lookahead=cfg, **kw)
        sync()
        t0 = time.perf_counter()
        plain = model.generate(enc.input_ids, lookahead=False, **kw)
        sync()
        t1 = time.perf_counter()
        model.trie = copy.deepcopy(warm)
        look = model.generate(enc.input_ids, lookahead=cfg, **kw)
        sync()
        tp, tl = t1 - t0, time.perf_counter() - t1
        same = sum(a == b for a, b in zip(look.sequences.tolist(), plain.sequences.tolist()))
        n = B * tokens
        lines.append(f"| {B} | {n / tp:.0f} | {n / tl:.0f} | {tp / tl:.2f}x | {look.stats.accepted_per_step:.2f} | "
                     f"{same}/{B} |")
        print(lines[-1], flush=True)
    return lines


def ncu_driver(args) -> list[str]:
    """What Nsight Compute watches (gpu_exact_session.sh): SmolLM2 bf16, exact on, one lookahead generate."""
    model, tok = smollm2(torch.float32 if SMOKE else torch.bfloat16)
    model.set_exact(True)
    out = model.generate(spec_bench_prompts(tok, 1)[0], max_new_tokens=8 if SMOKE else 64,
                         lookahead=configs(True)[0], return_dict_in_generate=True)
    return [f"ncu driver: {out.stats.new_tokens} tokens in {out.stats.steps} steps"]


PARTS = {"gemm": gemm, "step": step, "attention": attention, "lossless7b": lossless7b, "lossless": lossless,
         "batch": batch, "ncu_driver": ncu_driver}


def main() -> None:
    global SMOKE
    p = argparse.ArgumentParser()
    p.add_argument("parts", nargs="+", choices=list(PARTS))
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, not the GPU")
    args = p.parse_args()
    SMOKE = args.smoke
    if SMOKE:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_exact.py measures a GPU; run it with --smoke on a machine without one")
    for part in args.parts:
        if SMOKE:  # the Triton kernels (interpreted) on the tiny shapes; the torch path for SmolLM2's 49k vocab
            os.environ["LOOKAHEAD_KERNELS"] = "triton" if part in ("gemm", "step", "attention", "lossless7b") else ""
        t0 = time.perf_counter()
        try:
            lines = PARTS[part](args)
        except Exception as e:  # one failed part must not cost the others their (paid) GPU time
            import traceback

            traceback.print_exc()
            lines = [f"### {part}: FAILED ({type(e).__name__}: {e})"]
        text = "\n".join(lines) + f"\n\n({part}: {time.perf_counter() - t0:.0f} s)\n"
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
