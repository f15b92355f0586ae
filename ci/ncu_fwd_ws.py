"""The sm90 Gluon forward images at the FA2 grid's s512 point (bf16, batch 32, 2048 / head_dim heads: 16 at d128, 32
at d64): non-causal (the plain walk), then causal (the pairs walk), three calls each, for Nsight Compute, to see where
short causal tiles lose (issue 21's "no point below 0.8"; docs/bench/gluon-ws-notes.md, "Next"):

    ncu -k regex:attn_fwd_ws --launch-skip 2 --launch-count 4 --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section SourceCounters python ci/ncu_fwd_ws.py [--head-dim 64]

(--launch-skip 2 --launch-count 4: the third non-causal call, then the three causal ones.)
"""
import argparse
import os

os.environ.setdefault("FA2RT_ROUTING", "0")  # fa2rt's own images, not the SDPA backend the routing table picks

import torch  # noqa: E402

import fa2rt  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--head-dim", type=int, choices=(64, 128), default=128)
head_dim = parser.parse_args().head_dim
q, k, v = (torch.randn(32, 512, 2048 // head_dim, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for causal in (False, True):
    print(f"causal={causal}: {fa2rt.explain(q, k, v, causal=causal).image}", flush=True)
    for _ in range(3):
        fa2rt.attention(q, k, v, causal=causal)
torch.cuda.synchronize()
