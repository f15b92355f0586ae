# throwaway: what the decode+append step runs on the GPU
import torch, fa2rt
from torch.profiler import profile, ProfilerActivity
b, n, h, hk, d = 8, 4096, 32, 8, 128
mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
q, kc, vc, kn, vn = mk(b, 1, h, d), mk(b, n, hk, d), mk(b, n, hk, d), mk(b, 1, hk, d), mk(b, 1, hk, d)
sl = torch.full((b,), n - 1, dtype=torch.int32, device="cuda")
f = lambda: fa2rt.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=sl, causal=True)
for _ in range(10): f()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(20): f()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
