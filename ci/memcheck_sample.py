"""A few forward calls for compute-sanitizer memcheck: ragged lengths, causal, GQA, both head dims."""

import torch

import fa2rt

for b, nq, nk, h, hk, d, causal in [(1, 257, 300, 4, 2, 64, True), (2, 129, 77, 2, 1, 128, True),
                                    (1, 1, 1, 1, 1, 64, False), (1, 200, 333, 2, 2, 128, False)]:
    q = torch.randn(b, nq, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, nk, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert fa2rt.explain(q, k, v, causal=causal).path == "kernel"
    out, lse = fa2rt.attention(q, k, v, causal=causal, return_lse=True)
torch.cuda.synchronize()
print("memcheck sample ran", torch.isfinite(out).all().item())
