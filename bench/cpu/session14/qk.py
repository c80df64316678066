"""1B Q4_K (and Q6_K) weights in cache: old vs new op. qk.py COMMIT THREADS"""
import sys, time, statistics, tempfile, importlib, torch
from pathlib import Path
sys.path.insert(0, "/work/main/profiling"); sys.path.insert(0, "/work/main")
from before_after import export_old
tmp = Path(tempfile.mkdtemp(prefix="lookahead_old_")); export_old(sys.argv[1], tmp); sys.path.insert(0, str(tmp))
importlib.import_module("lookahead_old.kernels.cpu").load(); importlib.import_module("lookahead.kernels.cpu").load()
torch.set_num_threads(int(sys.argv[2]))
from lookahead.models.gguf import GGUFFile
gf = GGUFFile(Path("/tmp/1b/1b-Q4_K_M.gguf"))
names = [n for n in ("blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight") if n in gf.tensors]
for name in names:
    w = gf.fused([name])[0].clone()
    w = w[:1024] if w.shape[0] > 1024 else w
    wo, wn = torch.ops.lookahead_old_cpu.quant_repack(w), torch.ops.lookahead_cpu.quant_repack(w)
    EL = 256
    K = w.shape[1] * EL
    for M in (1, 2, 4, 8):
        x = torch.randn(M, K).bfloat16()
        assert torch.equal(torch.ops.lookahead_old.quant_linear(x, wo, None), torch.ops.lookahead.quant_linear(x, wn, None))
        res = {0: [], 1: []}
        for _ in range(7):
            for i, (op, ww) in enumerate(((torch.ops.lookahead_old, wo), (torch.ops.lookahead, wn))):
                t0 = time.perf_counter()
                for _ in range(30): op.quant_linear(x, ww, None)
                res[i].append((time.perf_counter() - t0) / 30)
        o, n = statistics.median(res[0]), statistics.median(res[1])
        macs = M * w.shape[0] * K
        print(f"{name} {tuple(w.shape)} M={M}: old {o*1e6:.1f} us ({macs/o/1e9:.0f} GMAC/s) new {n*1e6:.1f} us ({macs/n/1e9:.0f}) new/old {n/o:.2f}", flush=True)
