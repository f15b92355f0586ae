"""One decode step (bf16 d128, batch 8, cache 32k, GQA 32/8, num_splits=0) on a contiguous cache, then on 64-token
pages, three calls each, for Nsight Compute (docs/bench/ncu-decode-paged-h200.txt):

    ncu -k regex:attn_decode$ --launch-skip 2 --launch-count 2 --section SpeedOfLight --section Occupancy \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section LaunchStats \
        python ci/ncu_decode_paged.py
"""
import torch

import fa2rt
from fa2rt.bench import decode as bdec

for layout in ("contiguous", "paged64"):
    q, kc, vc, kw = bdec.make_point(8, 32768, 32, 8, 128, layout, append=False)
    for _ in range(3):
        fa2rt.attention_with_kvcache(q, kc, vc, **kw)
    torch.cuda.synchronize()
    del q, kc, vc, kw
    torch.cuda.empty_cache()
