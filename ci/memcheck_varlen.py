"""Varlen forward and backward calls for compute-sanitizer memcheck (DESIGN point 10): well-formed packed batches
(empty and one-token sequences, GQA, causal, windows, softcap, ALiBi per sequence), then malformed cu_seqlens that
validation cannot see on the GPU (decreasing, negative, past the total, longer than max_seqlen): the kernels must keep
every access inside the tensors. Expect 0 errors:

    compute-sanitizer --tool memcheck python ci/memcheck_varlen.py
"""

import os

import torch

import fa2rt
from fa2rt import config

os.environ.pop(config.CHECK_INDICES, None)  # the malformed calls must reach the kernels
os.environ[config.MIN_SEQLEN] = "0"


def cu(bounds):
    return torch.tensor(bounds, dtype=torch.int32, device="cuda")


def run(total_q, total_k, h, hk, d, cu_q, cu_k, max_q, max_k, **kwargs):
    q = torch.randn(total_q, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(total_k, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    decision = fa2rt.explain(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    assert decision.path == "kernel" and len(decision.backward) == 2 and "-varlen-" in decision.image, decision
    out = fa2rt.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    out.float().sum().backward()
    return out


WELL_FORMED = [  # lengths of q, lengths of k, nheads, nheads_k, head_dim, kwargs
    ((300, 0, 1, 129), (257, 5, 1, 0), 4, 2, 64, {"causal": True}),
    ((77, 200), (130, 33), 2, 1, 256, {"window_size": (9, 3)}),
    ((64, 65), (63, 128), 4, 4, 96, {"softcap": 10.0}),
    ((50, 1, 90), (40, 2, 90), 4, 2, 128, {"causal": True, "alibi_slopes": torch.rand(3, 4, device="cuda")}),
]
for lens_q, lens_k, h, hk, d, kwargs in WELL_FORMED:
    bq = torch.tensor([0, *lens_q]).cumsum(0).tolist()
    bk = torch.tensor([0, *lens_k]).cumsum(0).tolist()
    run(bq[-1], bk[-1], h, hk, d, cu(bq), cu(bk), max(lens_q), max(lens_k), **kwargs)

MALFORMED = [  # cu_seqlens (q and k), max_seqlen, over 700 tokens
    ([0, 300, 100, 700], 300),
    ([0, 100, 5000, 1 << 30], 700),
    ([-50, 100, -3, 700], 700),
    ([0, 700, 700, 700], 64),
    ([0, (1 << 31) - 1, 0, 700], 700),
]
for bounds, max_len in MALFORMED:
    out = run(700, 700, 4, 2, 64, cu(bounds), cu(bounds), max_len, max_len, causal=True)
torch.cuda.synchronize()
print("memcheck varlen ran", len(WELL_FORMED), "well-formed and", len(MALFORMED), "malformed calls")
