"""bf16 tree_attention of an older commit (argv[1], default HEAD) and of this checkout against an fp64 reference: the
largest error of each and the share of outputs that differ. Usage: acc_check.py [COMMIT]"""
import sys, tempfile, importlib, torch
from pathlib import Path
sys.path.insert(0, "/work/main/profiling")
from before_after import export_old
tmp = Path(tempfile.mkdtemp(prefix="lookahead_old_")); export_old(sys.argv[1] if len(sys.argv) > 1 else "HEAD", tmp); sys.path.insert(0, str(tmp))
importlib.import_module("lookahead_old.kernels.cpu").load(); importlib.import_module("lookahead.kernels.cpu").load()
old, new = torch.ops.lookahead_old, torch.ops.lookahead
g = torch.Generator().manual_seed(0)
for D in (64, 80, 7, 128):
  for T in (1, 3, 8):
    L = 300; hq, hkv = 9, 3
    k = torch.randn(1, hkv, L + T, D, generator=g).bfloat16(); v = torch.randn(1, hkv, L + T, D, generator=g).bfloat16()
    q = (torch.randn(1, T, hq, D, generator=g) * 2).bfloat16(); lens = torch.tensor([L]); sc = D ** -0.5
    a = old.tree_attention(q, k, v, lens, None, sc); b = new.tree_attention(q, k, v, lens, None, sc)
    kk = k.double().repeat_interleave(hq // hkv, 1); vv = v.double().repeat_interleave(hq // hkv, 1)
    s = torch.einsum("bthd,bhnd->bhtn", q.double(), kk) * sc
    s = s.masked_fill(torch.arange(L + T)[None, :] > L + torch.arange(T)[:, None], float("-inf"))
    ref = torch.einsum("bhtn,bhnd->bthd", s.softmax(-1), vv)
    print(f"D={D} T={T}: old err {(a.double()-ref).abs().max():.2e} new err {(b.double()-ref).abs().max():.2e}  differ {(a != b).float().mean():.4f}")
