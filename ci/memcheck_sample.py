"""Forward and backward calls for compute-sanitizer memcheck: ragged lengths, causal, windows, softcap, ALiBi, GQA,
head dims below their bucket, every bucket, an out= view (forward only), and d64/d128 forward calls at the edges of
the persistent tile walks. On sm90 the d64/d128 calls without score terms run the warp-specialised backward (dQ added by
TMA reduce into an fp32 accumulator), the others the FA2 kernels."""

import os

os.environ.setdefault("FA2RT_ROUTING", "0")  # fa2rt's own kernels, not the SDPA backends the routing table picks

import torch  # noqa: E402

import fa2rt  # noqa: E402

CASES = [  # b, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, extra kwargs
    (1, 257, 300, 4, 2, 64, {"causal": True}),
    (2, 129, 77, 2, 1, 128, {"causal": True}),
    (1, 1, 1, 1, 1, 64, {}),
    (1, 200, 333, 2, 2, 128, {}),
    (1, 300, 200, 4, 1, 64, {"window_size": (50, 10)}),  # on sm90 d64/d128: the warp-specialised backward
    (1, 190, 150, 2, 1, 8, {"window_size": (5, 3)}),
    (2, 100, 260, 4, 4, 40, {"window_size": (17, -1), "causal": True}),
    (1, 131, 131, 2, 2, 96, {"softcap": 20.0}),
    (2, 77, 200, 4, 2, 256, {"alibi_slopes": torch.rand(2, 4, device="cuda")}),
    (1, 64, 65, 2, 1, 32, {"softcap": 5.0, "alibi_slopes": torch.rand(2, device="cuda"), "window_size": (3, 3)}),
]
for b, nq, nk, h, hk, d, kwargs in CASES:
    q = torch.randn(b, nq, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, nk, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    decision = fa2rt.explain(q, k, v, **kwargs)
    assert decision.path == "kernel" and decision.backward, decision
    out, lse = fa2rt.attention(q, k, v, return_lse=True, **kwargs)
    out.backward(torch.randn_like(out))
    grads_finite = all(torch.isfinite(t.grad).all().item() for t in (q, k, v))
big = torch.empty(1, 300, 4, 80, device="cuda", dtype=torch.bfloat16)
q = torch.randn(1, 300, 4, 64, device="cuda", dtype=torch.bfloat16)  # no grad: out= is forward only
fa2rt.attention(q, q, q, causal=True, out=big[..., :64])
# Forward only (on sm90 the Gluon images' persistent walks, d64 and d128): tile counts at the walks' edges (fewer
# tiles than SMs, an odd count of two-tile units), bands, seqlen_q != seqlen_k.
WALKS = [(3, 300, 300, 5, 5, 128, {"causal": True}), (1, 128 * 39, 128 * 39, 7, 7, 128, {"causal": True}),
         (1, 128 * 39 - 5, 4000, 7, 7, 128, {"causal": True}), (2, 2500, 3000, 3, 1, 128, {"window_size": (300, 0)}),
         (1, 128 * 39, 128 * 39, 7, 7, 128, {}), (2, 333, 517, 4, 2, 64, {}), (1, 128 * 39 - 5, 4000, 7, 7, 64, {}),
         (3, 300, 300, 5, 5, 64, {"causal": True}), (1, 128 * 39 - 5, 4000, 7, 7, 64, {"causal": True}),
         (2, 2500, 3000, 3, 1, 64, {"window_size": (300, 0)}),
         # banded calls of at most 512 keys (1024 at d128): the short images
         (33, 512, 512, 8, 8, 64, {"causal": True}), (4, 700, 450, 6, 2, 64, {"causal": True}),
         (5, 1000, 1024, 9, 3, 128, {"window_size": (300, 0)}), (4, 700, 450, 6, 2, 128, {"causal": True})]
for b, nq, nk, h, hk, d, kwargs in WALKS:
    q = torch.randn(b, nq, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, nk, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert fa2rt.explain(q, k, v, **kwargs).path == "kernel"
    fa2rt.attention(q, k, v, **kwargs)
torch.cuda.synchronize()
print("memcheck sample ran", torch.isfinite(out).all().item(), grads_finite)
