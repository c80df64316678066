# one process: plain vs lookahead on the shipped model; per-step nodes, tokens, step time and _run time
import sys, time, torch, collections, statistics
from transformers import AutoTokenizer
from lookahead.models import LlamaForLookahead
from lookahead.models.checkpoint import resolve_checkpoint
from lookahead.data import round_robin, read_first_turns, spec_bench_path, encode_prompt
import lookahead.engine.pricing as pr
import lookahead.engine.engine as en
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
model = LlamaForLookahead.from_pretrained("smollm2-135m-instruct")
tok = AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"))
items = round_robin(read_first_turns(spec_bench_path()), 2)[:int(sys.argv[1])]
prompts = [encode_prompt(tok, t, True) for _, t in items]
cur = {}
log = []
orig_run = en.Engine._run
def run(self, start, stop, chains, trees, top_k):
    t0 = time.perf_counter(); r = orig_run(self, start, stop, chains, trees, top_k)
    cur["run"] = time.perf_counter() - t0
    cur["nodes"] = sum(len(t.tokens) for t in trees if t is not None)
    return r
en.Engine._run = run
orig_sr = en.Engine._step_rows
def step_rows(self, chosen, budget, decode):
    cur.clear(); t0 = time.perf_counter(); ev = orig_sr(self, chosen, budget, decode); s = time.perf_counter() - t0
    if decode and "nodes" in cur and ev:
        log.append((cur["nodes"] > 1, s, sum(len(e[1]) for e in ev), cur["nodes"], cur["run"]))
    return ev
en.Engine._step_rows = step_rows
for ids in prompts: model.generate(ids, max_new_tokens=8, lookahead=False)
res = {}
import os
order = [("plain", False), ("lookahead", True), ("nogate", True), ("plain", False), ("lookahead", True), ("nogate", True)]
if len(sys.argv) > 3: order = order[:3]
for name, la in order:
    os.environ["LOOKAHEAD_DRAFT_GATE"] = "0" if name == "nogate" else "1"
    model.trie.clear() if hasattr(model, "trie") and hasattr(model.trie, "clear") and la else None
    log.clear(); t = 0.0; n = 0
    for ids in prompts:
        out = model.generate(ids, max_new_tokens=128, lookahead=la, return_dict_in_generate=True)
        t += out.stats.decode_s; n += out.stats.new_tokens - 1
    if la:
        for k, c in model.state.step_costs.items(): print("  cost", k, {k: round(1e3 * v.ratio(), 2) for k, v in sorted(c.seen.items())})
    print(name, f"decode {1e3*t/n:.3f} ms/token, steps logged {len(log)}")
    if name == "plain":
        plain_run = statistics.median(x[4] for x in log); plain_step = statistics.median(x[1] for x in log)
        print(f"  plain: median step {1e3*plain_step:.3f} ms, _run {1e3*plain_run:.3f} ms")
    else:
        by = collections.defaultdict(list)
        for d, s, k, nodes, r in log: by[(d, nodes)].append((s, k, r))
        for key in sorted(by):
            xs = by[key]
            print(f"  drafted={key[0]} nodes={key[1]}: steps {len(xs)}, tok/step {sum(x[1] for x in xs)/len(xs):.3f}, step {1e3*statistics.median(x[0] for x in xs):.3f} ms, _run {1e3*statistics.median(x[2] for x in xs):.3f} ms ({statistics.median(x[2] for x in xs)/plain_run:.2f}x plain _run), host {1e3*statistics.median(x[0]-x[2] for x in xs):.3f} ms")
        tot = len(log); tk = sum(x[2] for x in log)
        print(f"  all: {tk/tot:.3f} tok/step; drafted share {sum(1 for x in log if x[0])/tot:.2f}")
