# one process: the drafter's _proposal time over the shipped Spec-Bench replay (warm, the Q4_1 curve of 2026-12-07 in
# q41_curve.json), each match's candidates computed as read (lazy) vs all at once (eager: len() forced), 3 rounds
import time, json
from lookahead.benchmarks import replay as rp
from lookahead.config import LookaheadConfig
from lookahead.drafting import trie as tr, drafter as dr
curve = json.load(open("bench/cpu/session15/q41_curve.json")); curve = {int(k): v for k, v in curve.items()}
header, records = rp.load_recording()
orig = tr.TokenTrie._candidates
def eager(self, *a, **k):
    q, e, nodes = orig(self, *a, **k); len(nodes); return q, e, nodes
spent = [0.0]
orig_prop = dr.Drafter._proposal
def timed(self, *a, **k):
    t0 = time.perf_counter(); r = orig_prop(self, *a, **k); spent[0] += time.perf_counter() - t0; return r
dr.Drafter._proposal = timed
res = {}
for rnd in range(3):
    for mode in ("eager", "lazy"):
        tr.TokenTrie._candidates = eager if mode == "eager" else orig
        spent[0] = 0.0
        out = rp.replay(records, LookaheadConfig(), curve)
        res.setdefault(mode, []).append(spent[0])
        print(mode, f"_proposal {spent[0]:.3f} s", {k: (round(v.tokens_per_step, 4) if hasattr(v, 'tokens_per_step') else str(v)[:60]) for k, v in list(out.items())[:3]}, flush=True)
