# one process: plain vs lookahead with the gate off on the shipped model; per step (by nodes and top-k) the medians of the
# whole step, Engine._run, pack_ragged, verify_step, the forward (verify_ragged), draft_trees, the commit and accepted_tokens.
# usage: step_parts.py PROMPTS
import sys, time, torch, collections, statistics, os
from transformers import AutoTokenizer
from lookahead.models import LlamaForLookahead
from lookahead.models.checkpoint import resolve_checkpoint
from lookahead.data import round_robin, read_first_turns, spec_bench_path, encode_prompt
import lookahead.engine.engine as en
import lookahead.engine.step as st
torch.set_num_threads(2)
model = LlamaForLookahead.from_pretrained("smollm2-135m-instruct")
tok = AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"))
items = round_robin(read_first_turns(spec_bench_path()), 2)[:int(sys.argv[1])]
prompts = [encode_prompt(tok, t, True) for _, t in items]
cur = {}
def wrap(mod, name, key):
    f = getattr(mod, name)
    def g(*a, **k):
        t0 = time.perf_counter(); r = f(*a, **k); cur[key] = cur.get(key, 0) + time.perf_counter() - t0; return r
    setattr(mod, name, g)
wrap(en, "pack_ragged", "pack")
wrap(en, "verify_step", "verify_step")
import lookahead.drafting.drafter as dr
wrap(dr.Drafter, "draft_trees", "draft")
wrap(en.Engine, "_commit", "commit")
wrap(st, "accepted_tokens", "acc")
orig_vr = type(model).verify_ragged
def vr(self, *a, **k):
    t0 = time.perf_counter(); r = orig_vr(self, *a, **k); cur["fwd"] = time.perf_counter() - t0; return r
type(model).verify_ragged = vr
orig_run = en.Engine._run
def run(self, start, stop, chains, trees, top_k):
    t0 = time.perf_counter(); r = orig_run(self, start, stop, chains, trees, top_k)
    cur["run"] = time.perf_counter() - t0
    cur["nodes"] = sum(len(t.tokens) for t in trees if t is not None); cur["topk"] = top_k
    return r
en.Engine._run = run
orig_sr = en.Engine._step_rows
log = []
def step_rows(self, chosen, budget, decode):
    cur.clear(); t0 = time.perf_counter(); ev = orig_sr(self, chosen, budget, decode); s = time.perf_counter() - t0
    if decode and "nodes" in cur and ev:
        log.append(dict(cur, step=s))
    return ev
en.Engine._step_rows = step_rows
os.environ["LOOKAHEAD_DRAFT_GATE"] = "0"
for ids in prompts: model.generate(ids, max_new_tokens=8, lookahead=False)
for name, la in [("plain", False), ("nogate", True), ("plain", False), ("nogate", True)]:
    log.clear()
    for ids in prompts: model.generate(ids, max_new_tokens=128, lookahead=la)
    by = collections.defaultdict(list)
    for e in log: by[(e["nodes"], e["topk"])].append(e)
    print(name)
    for k in sorted(by):
        xs = by[k]
        if len(xs) < 5: continue
        med = lambda f: 1e3 * statistics.median(f(x) for x in xs)
        print(f"  nodes={k[0]} topk={k[1]} n={len(xs)} step {med(lambda x: x['step']):.2f} run {med(lambda x: x['run']):.2f} pack {med(lambda x: x['pack']):.3f} verify_step {med(lambda x: x['verify_step']):.2f} fwd {med(lambda x: x['fwd']):.2f} draft {med(lambda x: x.get('draft',0)):.3f} commit {med(lambda x: x.get('commit',0)):.3f} acc {med(lambda x: x.get('acc',0)):.3f}")
