"""tree_attention: old commit vs working tree, bit for bit on random trees/chains/ragged, then timing.
Usage: attn_ab.py COMMIT [THREADS]"""
import sys, time, statistics, tempfile, importlib, os, torch
from pathlib import Path
sys.path.insert(0, "/work/main/profiling"); sys.path.insert(0, "/work/main")
from before_after import export_old
tmp = Path(tempfile.mkdtemp(prefix="lookahead_old_")); export_old(sys.argv[1], tmp); sys.path.insert(0, str(tmp))
importlib.import_module("lookahead_old.kernels.cpu").load(); importlib.import_module("lookahead.kernels.cpu").load()
old, new = torch.ops.lookahead_old, torch.ops.lookahead
g = torch.Generator().manual_seed(1)
def tree_mask(B, T):
    m = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        par = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)]
        for i in range(T):
            j = i
            while j >= 0: m[b, i, j] = True; j = par[j]
    return m
checks = 0
for threads in ((1, 2) if not os.environ.get("NOCHECK") else ()):
    torch.set_num_threads(threads)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for D in (64, 80, 128, 200, 16, 8):
            for (B, T, hq, hkv) in ((1, 1, 9, 3), (1, 8, 9, 3), (2, 5, 4, 4), (3, 17, 8, 2), (1, 40, 2, 1)):
                for ctx in (0, 1, 37, 256, 700):
                    if ctx > 300 and D > 64: continue
                    S = ctx + T + 3
                    k = torch.randn(B, hkv, S, D, generator=g).to(dt); v = torch.randn(B, hkv, S, D, generator=g).to(dt)
                    q = torch.randn(B, T, hq, D, generator=g).to(dt)
                    lens = torch.randint(max(0, ctx - 5), ctx + 1, (B,), generator=g)
                    for mask in (None, tree_mask(B, T)):
                        a = old.tree_attention(q, k, v, lens, mask, D ** -0.5)
                        b_ = new.tree_attention(q, k, v, lens, mask, D ** -0.5)
                        assert torch.equal(a, b_), (threads, dt, D, B, T, ctx, mask is None)
                        checks += 1
                    # ragged: all rows' tokens flattened, shuffled rows
                    N = B * T
                    perm = torch.randperm(N, generator=g)
                    rows = (torch.arange(N) // T)[perm]; nodes = (torch.arange(N) % T)[perm]
                    qr = q.reshape(N, hq, D)[perm].contiguous()
                    tm = tree_mask(B, T)
                    mr = tm.reshape(N, T)[perm].contiguous()
                    for mask in (None, mr):
                        a = old.tree_attention(qr, k, v, lens, mask, D ** -0.5, rows, nodes)
                        b_ = new.tree_attention(qr, k, v, lens, mask, D ** -0.5, rows, nodes)
                        assert torch.equal(a, b_), ("ragged", threads, dt, D, B, T, ctx)
                        checks += 1
print(f"{checks} cases equal", flush=True)
th = int(sys.argv[2]) if len(sys.argv) > 2 else 2
torch.set_num_threads(th)
HQ, HKV = (int(v) for v in os.environ.get("HEADS", "9,3").split(","))
for dt in (torch.bfloat16, torch.float32):
    for ctx in (256, 2048):
        for T in (1, 2, 4, 8, 16):
            k = torch.randn(1, HKV, ctx + 64, 64).to(dt); v = torch.randn(1, HKV, ctx + 64, 64).to(dt)
            q = torch.randn(1, T, HQ, 64).to(dt); lens = torch.tensor([ctx]); mask = tree_mask(1, T)
            res = {"o": [], "n": []}
            for _ in range(15):
                for key, ops in (("o", old), ("n", new)):
                    t0 = time.perf_counter()
                    for _ in range(20): ops.tree_attention(q, k, v, lens, mask, 0.125)
                    res[key].append((time.perf_counter() - t0) / 20)
            o_, n_ = statistics.median(res["o"]), statistics.median(res["n"])
            print(f"{str(dt)[6:]} ctx {ctx} T={T:2d} {th}t: old {o_*1e6:7.1f} us new {n_*1e6:7.1f} us new/old {n_/o_:.3f}", flush=True)
