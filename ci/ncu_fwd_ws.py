"""The sm90 Gluon forward images at the FA2 grid's s512 point (bf16 d128, batch 32, 16 heads): non-causal (the plain
walk), then causal (the pairs walk), three calls each, for Nsight Compute, to see where short causal tiles lose
(issue 21's "no point below 0.8"; docs/bench/gluon-ws-notes.md, "Next"):

    ncu -k regex:attn_fwd_ws --launch-skip 2 --launch-count 4 --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section SourceCounters python ci/ncu_fwd_ws.py

(--launch-skip 2 --launch-count 4: the third non-causal call, then the three causal ones.)
"""
import os

os.environ.setdefault("FA2RT_ROUTING", "0")  # fa2rt's own images, not the SDPA backend the routing table picks

import torch  # noqa: E402

import fa2rt  # noqa: E402

q, k, v = (torch.randn(32, 512, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for causal in (False, True):
    print(f"causal={causal}: {fa2rt.explain(q, k, v, causal=causal).image}", flush=True)
    for _ in range(3):
        fa2rt.attention(q, k, v, causal=causal)
torch.cuda.synchronize()
