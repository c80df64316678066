"""Old commit vs working tree, one process: the quantized SmolLM2 file's linears (30 layers + head), M rows, bf16
activations, outputs asserted equal. Usage: qab.py COMMIT THREADS M,M,.. [gguf name]"""
import sys, time, statistics, tempfile, importlib, os, torch
from pathlib import Path
sys.path.insert(0, "/work/main/profiling"); sys.path.insert(0, "/work/main")
from before_after import export_old
tmp = Path(tempfile.mkdtemp(prefix="lookahead_old_")); export_old(sys.argv[1], tmp); sys.path.insert(0, str(tmp))
importlib.import_module("lookahead_old.kernels.cpu").load(); importlib.import_module("lookahead.kernels.cpu").load()
torch.set_num_threads(int(sys.argv[2]))
from lookahead.models.gguf import GGUFFile, gguf_file
import numpy as np
gf = GGUFFile(gguf_file(sys.argv[4] if len(sys.argv) > 4 else "smollm2-135m-instruct"))
L = int(gf.get("llama.block_count").contents()[0] if hasattr(gf.get("llama.block_count"), "contents") else gf.get("llama.block_count"))
def part(names):
    ps = gf.fused(names)
    return torch.cat([p.clone() for p in ps]) if len(ps) > 1 else ps[0].clone()
groups = {"wqkv": [], "wo": [], "w13": [], "w2": []}
if os.environ.get("SEP"):
    groups = {k: [part([f"blk.{l}.{k}.weight"]) for l in range(L)] for k in ("attn_q", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
for l in range(L if not os.environ.get("SEP") else 0):
    groups["wqkv"].append(part([f"blk.{l}.attn_q.weight", f"blk.{l}.attn_k.weight", f"blk.{l}.attn_v.weight"]))
    groups["wo"].append(part([f"blk.{l}.attn_output.weight"]))
    groups["w13"].append(part([f"blk.{l}.ffn_gate.weight", f"blk.{l}.ffn_up.weight"]))
    groups["w2"].append(part([f"blk.{l}.ffn_down.weight"]))
groups["head"] = [part(["output.weight" if "output.weight" in gf.tensors else "token_embd.weight"])]
NF = bool(os.environ.get("NEWFIRST"))
def both(w):
    if NF:
        nw = torch.ops.lookahead_cpu.quant_repack(w); return torch.ops.lookahead_old_cpu.quant_repack(w), nw
    ow = torch.ops.lookahead_old_cpu.quant_repack(w); return ow, torch.ops.lookahead_cpu.quant_repack(w)
for n in groups: groups[n] = [both(w) for w in groups[n]]
class _M: dtype = torch.bfloat16
m = _M()
EL = {34:32,18:32,20:32,22:32,24:32,144:256,176:256,210:256,1184:256,1680:256,544:64,288:64,320:64,352:64,384:64}
print({n: (tuple(g[0][0].shape), len(g)) for n, g in groups.items()}, flush=True)
old, new = torch.ops.lookahead_old, torch.ops.lookahead
g = torch.Generator().manual_seed(0)
for M in [int(v) for v in sys.argv[3].split(",")]:
    line, tot = f"M={M}:", {"o": 0.0, "n": 0.0}
    for name, ws in groups.items():
        xs = [torch.randn(M, w.shape[1] * EL[w.shape[2]], generator=g).to(m.dtype) for w, _ in ws]
        for (wo_, wn_), x in zip(ws, xs):
            if not torch.equal(old.quant_linear(x, wo_, None), new.quant_linear(x, wn_, None)): sys.exit(f"{name} differ")
        res = {"o": [], "n": []}
        for _ in range(9):
            for k, ops, i in (("o", old, 0), ("n", new, 1)):
                t0 = time.perf_counter()
                for w, x in zip(ws, xs): ops.quant_linear(x, w[i], None)
                res[k].append(time.perf_counter() - t0)
        o, nn = statistics.median(res["o"]), statistics.median(res["n"])
        tot["o"] += o; tot["n"] += nn
        line += f"  {name} {1e3*o:.2f}->{1e3*nn:.2f} ({nn/o:.2f})"
    print(line + f"  | all {1e3*tot['o']:.2f}->{1e3*tot['n']:.2f} ms new/old {tot['n']/tot['o']:.3f} (equal)", flush=True)
