"""Varlen forward and backward calls for compute-sanitizer memcheck (DESIGN point 10): well-formed packed batches
(empty and one-token sequences, GQA, causal, windows, softcap, ALiBi per sequence), then malformed cu_seqlens that
validation cannot see on the GPU (decreasing, negative, past the total, longer than max_seqlen): the kernels must keep
every access inside the tensors. Then paged-prefill calls (block_table, K/V in a page pool; forward only), well-formed
at page sizes 16 and 64 and with malformed tables (blocks outside the pool, negative, cu_seqlens_k longer than a
table row, decreasing). Expect 0 errors:

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


def run_paged(lens_q, cu_k, table, page_size, num_blocks, max_k, hk=2, d=64, **kwargs):
    q = torch.randn(sum(lens_q), 4, d, device="cuda", dtype=torch.bfloat16)
    k_pool, v_pool = (torch.randn(num_blocks, page_size, hk, d, device="cuda", dtype=torch.bfloat16)
                      for _ in range(2))
    cu_q, table = cu(torch.tensor([0, *lens_q]).cumsum(0).tolist()), cu(table).view(len(lens_q), -1)
    decision = fa2rt.explain(q, k_pool, v_pool, cu_q, cu(cu_k), max(lens_q), max_k, block_table=table, **kwargs)
    assert decision.path == "kernel" and "-varlen_paged-" in decision.image, decision
    return fa2rt.attention_varlen(q, k_pool, v_pool, cu_q, cu(cu_k), max(lens_q), max_k, block_table=table,
                                  **kwargs)


PAGED = [  # lengths of q, cu_seqlens_k, block table (flattened, one row per sequence), page size, pool pages, max_k
    ((300, 0, 1), [0, 257, 262, 263], list(range(16, -1, -1)) + [17] + [0] * 16 + [18] + [0] * 16, 16, 19, 257),
    ((129, 64), [0, 200, 264], [1, 3, 2, 0, 4, 0, 0, 0], 64, 5, 200),
    ((40, 40), [0, 40, 80], [0, 9, 1, 1 << 30, 3, 4], 16, 8, 40),  # outside the pool
    ((40, 40), [0, 40, 80], [-1, -(1 << 30), 0, 2, -5, 3], 16, 8, 40),  # negative
    ((40, 40), [0, 5000, 1 << 30], [0, 1, 2, 3, 4, 5], 16, 8, 48),  # longer than a table row
    ((40, 40), [0, 30, 5], [0, 1, 2, 3, 4, 5], 16, 8, 48),  # decreasing
]
with torch.no_grad():
    for lens_q, cu_k, table, page_size, num_blocks, max_k in PAGED:
        run_paged(lens_q, cu_k, table, page_size, num_blocks, max_k, causal=True)
torch.cuda.synchronize()
print("memcheck varlen ran", len(WELL_FORMED), "well-formed and", len(MALFORMED), "malformed calls;", len(PAGED),
      "paged calls (4 malformed)")
