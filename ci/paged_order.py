"""How much of the paged decode's gap to contiguous caches is the kernel and how much the pages' placement: one decode
step (bf16 d128, num_splits=0, CUDA graph replays) on a contiguous cache, and on the same logical cache in 64- and
256-token pages whose block table is either a random permutation of the pool (as the bench's paged points) or the
identity (each sequence's pages consecutive in memory, so the kernel's addressing is paged but the reads are not
scattered).

    python ci/paged_order.py OUT.json
"""

import json
import sys

import torch

from fa2rt.bench import common
from fa2rt.bench import decode as bdec

POINTS = ((1, 131072, 32, 8), (8, 32768, 32, 8), (64, 4096, 32, 8), (32, 32768, 32, 32), (64, 32768, 32, 32))


def main():
    rows = []
    for batch, cache, h, hk in POINTS:
        nbytes = bdec.moved_bytes(batch, cache, h, hk, 128)
        row = {"batch": batch, "cache": cache, "nheads": h, "nheads_k": hk, "tbps": {}}
        for layout in ("contiguous", "paged64", "paged256"):
            q, k_cache, v_cache, kw = bdec.make_point(batch, cache, h, hk, 128, layout, append=False)
            orders = ("shuffled", "ordered") if "block_table" in kw else ("",)
            for order in orders:
                if order == "ordered":
                    kw["block_table"] = torch.arange(kw["block_table"].numel(), dtype=torch.int32,
                                                     device=q.device).view_as(kw["block_table"])
                row["tbps"][f"{layout} {order}".strip()] = round(bdec.graphed_rate(q, k_cache, v_cache, kw, nbytes), 3)
            del q, k_cache, v_cache, kw
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"b{batch} n{cache} {h}/{hk}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["tbps"].items()), flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump({"environment": common.environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
