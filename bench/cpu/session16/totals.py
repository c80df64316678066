# one process: plain vs lookahead (gate on, default), shipped Q4_1, 2 threads; totals over the decode steps of
# 12 prompts x 128: where lookahead's time goes against plain's.
import sys, time, torch, collections, os
from transformers import AutoTokenizer
from lookahead.models import LlamaForLookahead
from lookahead.models.checkpoint import resolve_checkpoint
from lookahead.data import round_robin, read_first_turns, spec_bench_path, encode_prompt
import lookahead.engine.engine as en, lookahead.engine.step as st, lookahead.drafting.drafter as dr
torch.set_num_threads(2)
model = LlamaForLookahead.from_pretrained("smollm2-135m-instruct")
tok = AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"))
items = round_robin(read_first_turns(spec_bench_path()), 2)[:int(sys.argv[1])]
prompts = [encode_prompt(tok, t, True) for _, t in items]
cur = {}
def wrap(obj, name, key):
    f = getattr(obj, name)
    def g(*a, **k):
        t0 = time.perf_counter(); r = f(*a, **k); cur[key] = cur.get(key, 0) + time.perf_counter() - t0; return r
    setattr(obj, name, g)
wrap(en, "pack_ragged", "pack"); wrap(en, "verify_step", "verify_step"); wrap(dr.Drafter, "draft_trees", "draft")
wrap(dr.Drafter, "update", "update"); wrap(en.Engine, "_commit", "commit")
orig_vr = type(model).verify_ragged
def vr(self, *a, **k):
    t0 = time.perf_counter(); r = orig_vr(self, *a, **k); cur["fwd"] = cur.get("fwd", 0) + time.perf_counter() - t0; return r
type(model).verify_ragged = vr
orig_run = en.Engine._run
def run(self, *a):
    t0 = time.perf_counter(); r = orig_run(self, *a); cur["run"] = cur.get("run", 0) + time.perf_counter() - t0; return r
en.Engine._run = run
orig_sr = en.Engine._step_rows
log = []
def step_rows(self, chosen, budget, decode):
    cur.clear(); t0 = time.perf_counter(); ev = orig_sr(self, chosen, budget, decode); s = time.perf_counter() - t0
    if decode and ev and all(s_.prefilled >= len(s_.prompt) for s_, _ in ev) and self.steps > 0:
        log.append(dict(cur, step=s, tokens=sum(len(n) for _, n in ev)))
    return ev
en.Engine._step_rows = step_rows
for ids in prompts[:3]: model.generate(ids, max_new_tokens=8, lookahead=True)
res = {}
for name, la in [("plain", False), ("lookahead", True), ("plain", False), ("lookahead", True)]:
    log.clear()
    for ids in prompts: model.generate(ids, max_new_tokens=128, lookahead=la)
    tot = collections.Counter()
    for e in log:
        for k, v in e.items(): tot[k] += v
    n = len(log)
    parts = {k: tot[k] for k in ("step", "fwd", "draft", "pack", "verify_step", "run", "commit", "update")}
    parts["tail"] = tot["verify_step"] - tot["fwd"]; parts["run_other"] = tot["run"] - tot["verify_step"] - tot["pack"]
    parts["commit_other"] = tot["commit"] - tot["update"]
    parts["rest"] = tot["step"] - tot["run"] - tot["draft"] - tot["commit"]
    print(f"{name}: steps {n} tokens {tot['tokens']} ({tot['tokens']/n:.2f}/step) step total {parts['step']:.3f} s = "
          + ", ".join(f"{k} {1e3*parts[k]/tot['tokens']:.3f}" for k in ("fwd", "draft", "pack", "tail", "run_other", "update", "commit_other", "rest")) + " ms per token")
