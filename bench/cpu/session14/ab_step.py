"""The verify step of this checkout against an older commit in one process (profiling/before_after.py's export):
model.verify at T nodes (a chain) behind --context committed tokens, old and new interleaved, median of repeats, outputs compared."""
import argparse, importlib, statistics, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, "/work/main/profiling")
from before_after import export_old
p = argparse.ArgumentParser()
p.add_argument("--old", required=True); p.add_argument("--model", required=True)
p.add_argument("--quantization", default=None); p.add_argument("--dtype", default="bf16")
p.add_argument("--threads", type=int, default=2); p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
p.add_argument("--repeats", type=int, default=21); p.add_argument("--new-first", action="store_true")
p.add_argument("--context", type=int, default=256)
a = p.parse_args()
torch.set_num_threads(a.threads)
tmp = Path(tempfile.mkdtemp(prefix="lookahead_old_")); export_old(a.old, tmp); sys.path.insert(0, str(tmp))
import re
for f in []:
    t = f.read_text()
    t2 = t.replace('Library("lookahead", "DEF")', 'Library("lookahead_old", "DEF")').replace('LIBRARY = "lookahead_cpu"', 'LIBRARY = "lookahead_old_cpu"')
    if t2 != t: f.write_text(t2)
pk = {"old": importlib.import_module("lookahead_old"), "new": importlib.import_module("lookahead")}
models, caches = {}, {}
for name in (("new", "old") if a.new_first else ("old", "new")):
    auto = importlib.import_module(pk[name].__name__ + ".models.auto")
    kw = {"quantization": a.quantization} if a.quantization else {}
    m = auto.load_model(a.model, a.dtype, "cpu", **kw)[0]
    cfg = m.config
    C = importlib.import_module(pk[name].__name__ + ".models.cache").KVCache
    c = C(cfg.n_layers, 1, cfg.n_kv_heads, a.context + max(a.sizes), cfg.head_dim, m.dtype, m.device); c.lens.fill_(a.context)
    models[name], caches[name] = m, c
from lookahead.kernels.cpu import cpu_name
times, outs = {}, {}
with torch.inference_mode():
    for T in a.sizes:
        toks = torch.arange(T)[None] * 37 + 11; dep = torch.arange(T)[None]
        for name in models:
            outs[name, T] = models[name].verify(toks, dep, caches[name], None)
    for _ in range(a.repeats):
        for T in a.sizes:
            toks = torch.arange(T)[None] * 37 + 11; dep = torch.arange(T)[None]
            for name in models:
                t0 = time.perf_counter(); models[name].verify(toks, dep, caches[name], None)
                times.setdefault((name, T), []).append(time.perf_counter() - t0)
print(f"{cpu_name()}; {a.threads} threads; {a.model} {a.quantization or ''} {a.dtype}; context {a.context}; median of {a.repeats}; old = {a.old}; {'new' if a.new_first else 'old'} loaded first")
base = {n: statistics.median(times[n, a.sizes[0]]) for n in models}
for T in a.sizes:
    o, n = statistics.median(times["old", T]), statistics.median(times["new", T])
    print(f"T={T:3d}: old {1e3*o:6.2f} ms ({o/base['old']:.2f}x)  new {1e3*n:6.2f} ms ({n/base['new']:.2f}x)  new/old {n/o:.3f}  logits equal {torch.equal(outs['old', T], outs['new', T])}")
