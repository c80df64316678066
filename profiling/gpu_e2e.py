"""End-to-end GPU measurements (issues 5 and 8); prints Markdown tables, optionally appends them to --out.

    python profiling/gpu_e2e.py lossless --data question.jsonl      # SmolLM2: fp32 lossless, bf16 divergence
    python profiling/gpu_e2e.py batch --data question.jsonl         # SmolLM2 bf16: B in {1, 4, 16, 64}
    python profiling/gpu_e2e.py shape7b                             # random Llama-2-7B shape, bf16

Timings are wall-clock around whole generate calls after a warm-up call (graphs captured, kernels compiled).
"""

from __future__ import annotations

import argparse
import copy
import time
from datetime import date
from pathlib import Path

import torch

from lookahead import LookaheadConfig
from lookahead.engine.pricing import measure_cost_curve
from lookahead.data import encode_prompt, spec_bench_first_turns
from lookahead.models.config import rope_inv_freq
from lookahead.drafting.trie import TokenTrie


def smollm2(dtype):
    from transformers import AutoTokenizer

    from lookahead.models import LlamaForLookahead, resolve_checkpoint

    model = LlamaForLookahead.from_pretrained("smollm2-135m-instruct", dtype=dtype, device="cuda")
    return model, AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"))


def chat(tokenizer, text: str) -> torch.Tensor:
    return encode_prompt(tokenizer, text, chat=True).cuda()


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def lossless(args) -> list[str]:
    prompts = spec_bench_first_turns(4, path=args.data)[:40]
    lines = [f"### Lossless on CUDA ({torch.cuda.get_device_name()}, {date.today()}), SmolLM2, 40 Spec-Bench "
             f"prompts x {args.tokens} new tokens, CUDA graphs", ""]
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = smollm2(dtype)
        model.state.forget_drafting()
        same, first_diff, acc = 0, [], []
        for k, (cat, text) in enumerate(prompts):
            ids = chat(tok, text)
            layout = ("hier", "par")[k % 2]
            if k % 4 < 2:
                model.state.forget_drafting()  # half the prompts cold
            plain = model.generate(ids, max_new_tokens=args.tokens, lookahead=False)[0].tolist()
            out = model.generate(ids, max_new_tokens=args.tokens, lookahead=LookaheadConfig(layout=layout),
                                 return_dict_in_generate=True)
            got = out.sequences[0].tolist()
            acc.append(out.stats.accepted_per_step)
            if got == plain:
                same += 1
            else:
                first_diff.append(next(i for i, (a, b) in enumerate(zip(got, plain)) if a != b) - ids.shape[1])
        name = str(dtype).removeprefix("torch.")
        lines.append(f"- {name}: lookahead == plain on {same}/40 prompts; mean accepted tokens/step "
                     f"{sum(acc) / len(acc):.2f}" + (f"; first divergence at new token {sorted(first_diff)}"
                                                     if first_diff else ""))
        del model
        torch.cuda.empty_cache()
    return lines


def batch(args) -> list[str]:
    model, tok = smollm2(torch.bfloat16)
    texts = [t for _, t in spec_bench_first_turns(10, path=args.data)]
    model.trie = TokenTrie()
    for text in texts[-20:]:  # warm-up split: never measured
        model.generate(chat(tok, text), max_new_tokens=args.tokens)
    # each measured run starts from a copy of the drafting memory (trie, calibration, recycled tokens): it never
    # sees its own earlier output
    warm = (model.state.trie, model.state.calibration, model.state.successors)
    tok.padding_side = "left"
    lines = [f"### Batch sweep, SmolLM2 bf16, {args.tokens} new tokens, {torch.cuda.get_device_name()}, "
             f"{date.today()} (warm trie: a 20-prompt warm-up split)", "",
             "| B | plain tok/s | lookahead tok/s | speedup | accepted/step | host share | rows identical |",
             "|---|---|---|---|---|---|---|"]
    for B in (1, 4, 16, 64):
        rows = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
                for t in (texts * 8)[:B]]
        enc = tok(rows, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
        kw = dict(attention_mask=enc.attention_mask, max_new_tokens=args.tokens, return_dict_in_generate=True,
                  eos_token_id=[])  # every row generates all its tokens: equal work for both
        model.generate(enc.input_ids, lookahead=False, **kw)  # warm-up: capture this batch's graphs
        model.state.trie, model.state.calibration, model.state.successors = copy.deepcopy(warm)
        model.generate(enc.input_ids, lookahead=True, **kw)
        plain, tp = timed(lambda: model.generate(enc.input_ids, lookahead=False, **kw))
        model.state.trie, model.state.calibration, model.state.successors = copy.deepcopy(warm)
        look, tl = timed(lambda: model.generate(enc.input_ids, lookahead=True, **kw))
        same = sum(a == b for a, b in zip(look.sequences.tolist(), plain.sequences.tolist()))
        n = B * args.tokens
        lines.append(f"| {B} | {n / tp:.0f} | {n / tl:.0f} | {tp / tl:.2f}x | {look.stats.accepted_per_step:.2f} | "
                     f"{100 * look.stats.host_s / tl:.1f}% | {same}/{B} |")
    return lines


def shape7b(args) -> list[str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lookahead.models import LlamaForLookahead

    hf_cfg = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(LlamaConfig(**hf_cfg)).to(torch.bfloat16).eval()
    cfg = LlamaForLookahead.config_from_hf(hf_cfg)
    with torch.device("meta"):
        ours = LlamaForLookahead(cfg)
    ours.load_state_dict(LlamaForLookahead.convert_state_dict(hf.state_dict(), cfg), assign=True, strict=False)
    ours.inv_freq = rope_inv_freq(cfg)
    ours = ours.to("cuda", torch.bfloat16).eval()
    curve = measure_cost_curve(ours, [1, 2, 4, 8, 16, 32, 64, 128])
    lines = [f"### Random-weight Llama-2-7B shape, bf16, {torch.cuda.get_device_name()}, {date.today()}", "",
             "Verify step (graph replay, 256 committed tokens): " +
             ", ".join(f"T={T}: {s * 1e3:.2f} ms" for T, s in curve.items()) +
             f". T=64 / T=1 = {curve[64] / curve[1]:.2f}x.", ""]
    g = torch.Generator().manual_seed(0)
    lines += ["| system | tok/s | accepted/step |", "|---|---|---|"]
    prompts = [torch.randint(3, 32000, (1, 100), generator=g).cuda() for _ in range(args.prompts)]
    hf_kw = dict(max_new_tokens=args.tokens, do_sample=False, pad_token_id=0, min_new_tokens=args.tokens)
    results = {}
    ours.trie = TokenTrie()
    ours.generate(prompts[0], max_new_tokens=8)  # warm-up
    hf.generate(prompts[0], attention_mask=torch.ones_like(prompts[0]), max_new_tokens=4, do_sample=False,
                pad_token_id=0)
    for name, fn in (("transformers greedy", lambda p: hf.generate(p, attention_mask=torch.ones_like(p), **hf_kw)),
                     ("transformers prompt lookup", lambda p: hf.generate(p, attention_mask=torch.ones_like(p),
                                                                          prompt_lookup_num_tokens=10, **hf_kw)),
                     ("ours plain (graphs)", lambda p: ours.generate(p, max_new_tokens=args.tokens, lookahead=False,
                                                                     eos_token_id=[], return_dict_in_generate=True)),
                     ("ours lookahead (graphs)", lambda p: ours.generate(p, max_new_tokens=args.tokens,
                                                                         eos_token_id=[],
                                                                         return_dict_in_generate=True))):
        total, toks, acc, host = 0.0, 0, [], 0.0
        for p in prompts:
            out, secs = timed(lambda: fn(p))
            total += secs
            toks += args.tokens
            if hasattr(out, "stats"):
                acc.append(out.stats.accepted_per_step)
                host += out.stats.host_s
        results[name] = toks / total
        lines.append(f"| {name} | {toks / total:.1f} | " + (f"{sum(acc) / len(acc):.2f} (host {100 * host / total:.1f}%)"
                                                          if acc else "1") + " |")
    return lines


def batch_cost(args) -> list[str]:
    """Verify cost per (B, nodes per row) on a random-weight SmolLM2-shape model (no checkpoint needed), timed
    on graph replays: what the adaptive budget weighs as the batch grows."""
    from lookahead.models.cache import KVCache
    from lookahead.models import LlamaForLookahead

    hf_cfg = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_theta=100000.0, tie_word_embeddings=True, eos_token_id=2)
    torch.manual_seed(0)
    cfg = LlamaForLookahead.config_from_hf(hf_cfg)
    with torch.device("cuda"):
        model = LlamaForLookahead(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model = model.to(torch.bfloat16).eval()
    lines = [f"### Verify cost vs batch, random-weight SmolLM2 shape, bf16, {torch.cuda.get_device_name()}, "
             f"{date.today()}", "", "ms per step (graph replay, 256 committed tokens per row)", "",
             "| B | T=1 | T=4 | T=16 | T=64 | T=64 / T=1 |", "|---|---|---|---|---|---|"]
    with torch.inference_mode():
        for B in (1, 4, 16, 64):
            cache = KVCache(cfg.n_layers, B, cfg.n_kv_heads, 256 + 64, cfg.head_dim, torch.bfloat16, "cuda")
            cache.lens.fill_(256)
            row = []
            for T in (1, 4, 16, 64):
                tokens = torch.zeros(B, T, dtype=torch.long, device="cuda")
                depths = torch.arange(T, device="cuda")[None].expand(B, T).contiguous()
                model.verify(tokens, depths, cache, None)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    model.verify(tokens, depths, cache, None)
                row.append(triton_bench(graph.replay))
            lines.append(f"| {B} | " + " | ".join(f"{ms:.2f}" for ms in row) + f" | {row[-1] / row[0]:.2f}x |")
            del cache
    return lines


def triton_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["lossless", "batch", "shape7b", "batch_cost"])
    p.add_argument("--data", type=Path, default=None, help="a Spec-Bench question.jsonl (default: the packaged one)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    lines = {"lossless": lossless, "batch": batch, "shape7b": shape7b, "batch_cost": batch_cost}[args.what](args)
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
