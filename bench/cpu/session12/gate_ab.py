# one process: plain vs lookahead with the gate at GATE_EMA 0.1 (default), 0.03, and without the gate; rounds alternate
import sys, os, time, torch
from transformers import AutoTokenizer
from lookahead.models import LlamaForLookahead
from lookahead.models.checkpoint import resolve_checkpoint
from lookahead.data import round_robin, read_first_turns, spec_bench_path, encode_prompt
import lookahead.engine.pricing as pr
torch.set_num_threads(int(sys.argv[2]))
model = LlamaForLookahead.from_pretrained(sys.argv[4] if len(sys.argv) > 4 else "smollm2-135m-instruct")
tok = AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"))
items = round_robin(read_first_turns(spec_bench_path()), 2)[:int(sys.argv[1])]
prompts = [encode_prompt(tok, t, True) for _, t in items]
for ids in prompts[:4]: model.generate(ids, max_new_tokens=8, lookahead=False)
systems = [("plain", None), ("gate0.1", 0.1), ("gate0.03", 0.03), ("nogate", None)]
res = {s: [] for s, _ in systems}
outs = {}
for rnd in range(int(sys.argv[3])):
    for name, ema in (systems if rnd % 2 == 0 else systems[::-1]):
        la = name != "plain"
        os.environ["LOOKAHEAD_DRAFT_GATE"] = "0" if name == "nogate" else "1"
        if ema: pr.GATE_EMA = ema
        model.trie.clear(); model.state.calibration = None if False else model.state.calibration
        t = 0.0; n = 0; steps = 0
        for i, ids in enumerate(prompts):
            out = model.generate(ids, max_new_tokens=128, lookahead=la, return_dict_in_generate=True)
            t += out.stats.decode_s; n += out.stats.new_tokens - 1; steps += out.stats.steps if hasattr(out.stats, "steps") else 0
            o = out.sequences[0].tolist() if hasattr(out, "sequences") else None
            if o is not None:
                if i in outs: assert outs[i] == o, (name, i)
                else: outs[i] = o
        res[name].append(1e3 * t / n)
        print(f"round {rnd} {name}: {1e3*t/n:.3f} ms/token", flush=True)
pr.GATE_EMA = 0.1
print("best:", {k: round(min(v), 3) for k, v in res.items()}, "plain/x:", {k: round(min(res['plain']) / min(v), 3) for k, v in res.items()})
