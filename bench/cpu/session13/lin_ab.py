"""Old commit vs working tree, one process: SmolLM2-135M-shaped linears (30 layers: wqkv, wo, w13, w2; random
weights), M rows, dtype. Outputs asserted equal. Usage: lin_ab.py COMMIT THREADS DTYPE M,M,..."""
import sys, time, statistics, tempfile, importlib, torch
from pathlib import Path
sys.path.insert(0, "/work/main/profiling")
from before_after import export_old
tmp = Path(tempfile.mkdtemp(prefix="lookahead_old_")); export_old(sys.argv[1], tmp); sys.path.insert(0, str(tmp))
importlib.import_module("lookahead_old.kernels.cpu").load(); importlib.import_module("lookahead.kernels.cpu").load()
torch.set_num_threads(int(sys.argv[2]))
dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[sys.argv[3]]
g = torch.Generator().manual_seed(0)
import os
shapes = [(49152, 576)] * 4 if os.environ.get("HEAD") else [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30
ws = [(torch.randn(n, k, generator=g) * 0.05).to(dt) for n, k in shapes]
old, new = torch.ops.lookahead_old, torch.ops.lookahead
print(torch.ops.lookahead_cpu.code_path() if hasattr(torch.ops.lookahead_cpu, "code_path") else "", flush=True)
for M in [int(v) for v in sys.argv[4].split(",")]:
    xs = [torch.randn(M, w.shape[1], generator=g).to(dt) for w in ws]
    for w, x in zip(ws, xs): (os.environ.get("NOASSERT") or torch.equal(old.linear(x, w, None), new.linear(x, w, None))) or sys.exit("differ")
    res = {"o": [], "n": []}
    for _ in range(9):
        for k, ops in (("o", old), ("n", new)):
            t0 = time.perf_counter()
            for w, x in zip(ws, xs): ops.linear(x, w, None)
            res[k].append(time.perf_counter() - t0)
    o, nn = statistics.median(res["o"]), statistics.median(res["n"])
    macs = M * sum(n * k for n, k in shapes)
    print(f"{sys.argv[3]} M={M}: old {1e3*o:.2f} ms new {1e3*nn:.2f} ms new/old {nn/o:.3f}  new {macs/nn/1e9:.1f} GMAC/s (equal)", flush=True)
