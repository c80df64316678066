import sys, time, statistics, torch
from lookahead.models import LlamaForLookahead
from lookahead.drafting.tree import DraftTree, pack_ragged
torch.set_num_threads(2)
m = LlamaForLookahead.from_pretrained("smollm2-135m-instruct")
def mk(par):
    dep = [0] * len(par)
    for i in range(1, len(par)): dep[i] = dep[par[i]] + 1
    return DraftTree([100 + 7 * i for i in range(len(par))], par, dep)
shapes = {"root": [-1], "chain2": [-1, 0], "chain4": [-1, 0, 1, 2], "star4": [-1, 0, 0, 0], "chain8": [-1, 0, 1, 2, 3, 4, 5, 6]}
batches = {k: pack_ragged([[]], [mk(p)], "cpu") for k, p in shapes.items()}
def busy(ms):
    t = time.perf_counter() + ms / 1e3
    x = 0
    while time.perf_counter() < t: x += 1
with torch.inference_mode():
    cache = m.kv_cache(1, 400); cache.lens.fill_(200)
    for host_ms in (0.0, 0.7, 0.0, 0.7):
        ts = {k: [] for k in shapes}
        for r in range(40):
            for k, b in batches.items():
                busy(host_ms)
                t0 = time.perf_counter(); m.verify_ragged(b.tokens, b.rows, b.nodes, b.depths, cache, b.mask, b.logit_index); ts[k].append(time.perf_counter() - t0)
        base = statistics.median(ts["root"])
        print(f"host work {host_ms} ms between forwards: " + "  ".join(f"{k} {1e3*statistics.median(v):.2f} ({statistics.median(v)/base:.2f}x)" for k, v in ts.items()), flush=True)
