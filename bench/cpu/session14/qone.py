"""one weight, repeated: old vs new op, L2-ish resident. qone.py COMMIT THREADS"""
import sys, time, statistics, tempfile, importlib, torch
from pathlib import Path
sys.path.insert(0, "/work/main/profiling"); sys.path.insert(0, "/work/main")
from before_after import export_old
tmp = Path(tempfile.mkdtemp(prefix="lookahead_old_")); export_old(sys.argv[1], tmp); sys.path.insert(0, str(tmp))
importlib.import_module("lookahead_old.kernels.cpu").load(); importlib.import_module("lookahead.kernels.cpu").load()
torch.set_num_threads(int(sys.argv[2]))
from lookahead.models.gguf import GGUFFile, gguf_file
gf = GGUFFile(gguf_file("smollm2-135m-instruct"))
cases = {"w13(Q4_1 3072x576)": torch.cat([gf.fused([f"blk.0.ffn_gate.weight"])[0].clone(), gf.fused([f"blk.0.ffn_up.weight"])[0].clone()]),
         "head rows 0-3071 (Q8_0)": gf.fused(["token_embd.weight"])[0][:3072].clone(),
         "w2 (Q4_1 576x1536)": gf.fused(["blk.0.ffn_down.weight"])[0].clone()}
for name, w in cases.items():
    wo, wn = torch.ops.lookahead_old_cpu.quant_repack(w), torch.ops.lookahead_cpu.quant_repack(w)
    K = w.shape[1] * 32
    for M in (1, 2, 4, 8):
        x = torch.randn(M, K).bfloat16()
        assert torch.equal(torch.ops.lookahead_old.quant_linear(x, wo, None), torch.ops.lookahead.quant_linear(x, wn, None))
        res = {0: [], 1: []}
        for _ in range(7):
            for i, (op, ww) in enumerate(((torch.ops.lookahead_old, wo), (torch.ops.lookahead, wn))):
                t0 = time.perf_counter()
                for _ in range(50): op.quant_linear(x, ww, None)
                res[i].append((time.perf_counter() - t0) / 50)
        o, n = statistics.median(res[0]), statistics.median(res[1])
        macs = M * w.shape[0] * K
        print(f"{name} M={M}: old {o*1e6:.1f} us ({macs/o/1e9:.0f} GMAC/s) new {n*1e6:.1f} us ({macs/n/1e9:.0f}) new/old {n/o:.2f}", flush=True)
