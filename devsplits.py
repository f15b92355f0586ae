# throwaway: decode split sweep
import json, os, sys, torch, triton
import fa2rt
out = []
def rate(b, n, h, hk, d, splits, page=0):
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
    if page:
        blocks = n // page
        kc = torch.randn(b * blocks, page, hk, d, device="cuda", dtype=torch.bfloat16); vc = torch.randn_like(kc)
        extra = dict(block_table=torch.randperm(b * blocks, device="cuda").view(b, blocks).int())
    else:
        kc = torch.randn(b, n, hk, d, device="cuda", dtype=torch.bfloat16); vc = torch.randn_like(kc)
        extra = {}
    sl = torch.full((b,), n, dtype=torch.int32, device="cuda")
    f = lambda: fa2rt.attention_with_kvcache(q, kc, vc, cache_seqlens=sl, causal=True, num_splits=splits, **extra)
    ms = triton.testing.do_bench(f, warmup=10, rep=40)
    return 2 * kc.numel() * 2 / ms / 1e9
for h, hk in ((32, 8), (32, 32)):
    for b, n in ((1, 4096), (1, 8192), (1, 32768), (1, 131072), (8, 4096), (8, 8192), (8, 32768), (32, 8192), (64, 8192), (64, 32768)):
        if b * n * hk * 128 * 4 > 40e9: continue
        row = {"b": b, "n": n, "h": h, "hk": hk, "rates": {}}
        for s in (1, 2, 4, 8, 16, 32, 64, 128):
            if n // s < 64: continue
            row["rates"][s] = round(rate(b, n, h, hk, 128, s), 3)
        best = max(row["rates"], key=row["rates"].get)
        auto = round(rate(b, n, h, hk, 128, 0), 3)
        print(b, n, f"{h}/{hk}", "auto", auto, "best", best, row["rates"][best], row["rates"], flush=True)
        row["auto"] = auto
        out.append(row)
        torch.cuda.empty_cache()
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/splits.json", "w"), indent=1)
