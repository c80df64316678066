import sys, time, statistics, torch, importlib
importlib.import_module("lookahead.kernels.cpu").load()
torch.set_num_threads(1)
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[1]]
for (n, k) in [(384, 576), (192, 1536), (96, 3072)]:
    w = (torch.randn(n, k) * 0.05).to(dt)
    for M in (1, 2, 4, 8, 16):
        x = torch.randn(M, k).to(dt)
        for _ in range(20): torch.ops.lookahead.linear(x, w, None)
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(200): torch.ops.lookahead.linear(x, w, None)
            ts.append((time.perf_counter() - t0) / 200)
        t = min(ts)
        print(f"{sys.argv[1]} {n}x{k} M={M}: {t*1e6:.1f} us {M*n*k/t/1e9:.1f} GMAC/s", flush=True)
