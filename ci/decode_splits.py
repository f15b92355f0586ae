"""The split-count sweep behind kvcache_ops.choose_splits: fa2rt.attention_with_kvcache's decode step (bf16 d128, one
query token, causal) at every power-of-two num_splits from 1 to 128, or the --splits given (none under
kvcache_ops.MIN_KEYS_PER_SPLIT keys), and at num_splits=0, each timed as a CUDA graph replay; batch x cache x heads x
layout as issue 17's grid, or the --batches and --caches given.

    python ci/decode_splits.py OUT.json [--layouts contiguous paged64] [--splits 1 2 ...] [--batches 1 8]

Prints per point the best split, the heuristic's split and the heuristic's rate as a share of the best.
"""

import argparse
import json

import torch

import fa2rt
from fa2rt import kvcache_ops
from fa2rt.bench import common
from fa2rt.bench import decode as bdec

BATCHES, CACHES, HEADS = (1, 8, 32, 64), (4096, 8192, 32768, 131072), ((32, 8), (32, 32))
MAX_BYTES = 40e9  # K and V of one point


def sweep_point(batch, cache, h, hk, layout, candidates) -> dict:
    q, k_cache, v_cache, kw = bdec.make_point(batch, cache, h, hk, 128, layout, append=False)
    nbytes = bdec.moved_bytes(batch, cache, h, hk, 128)
    splits = [s for s in candidates if cache // s >= kvcache_ops.MIN_KEYS_PER_SPLIT]
    rates = {s: round(bdec.graphed_rate(q, k_cache, v_cache, {**kw, "num_splits": s}, nbytes), 3) for s in splits}
    auto = fa2rt.explain_with_kvcache(q, k_cache, v_cache, **kw).message
    row = {"batch": batch, "cache": cache, "nheads": h, "nheads_k": hk, "layout": layout, "rates": rates,
           "auto": round(bdec.graphed_rate(q, k_cache, v_cache, kw, nbytes), 3), "auto_splits": auto}
    del q, k_cache, v_cache, kw
    torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--layouts", nargs="+", default=["contiguous", "paged64"])
    p.add_argument("--splits", nargs="+", type=int, default=[1 << i for i in range(8)])
    p.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    p.add_argument("--caches", nargs="+", type=int, default=CACHES)
    args = p.parse_args()
    rows = []
    for layout in args.layouts:
        for h, hk in HEADS:
            for batch in args.batches:
                for cache in args.caches:
                    if bdec.cache_bytes(batch, cache, hk, 128) > MAX_BYTES:
                        continue
                    row = sweep_point(batch, cache, h, hk, layout, args.splits)
                    best = max(row["rates"], key=row["rates"].get)
                    rows.append(row)
                    print(f"{layout:>10} {h}/{hk:<2} b{batch:<3} n{cache:<6} best {best:>3} {row['rates'][best]:.2f} "
                          f"auto {row['auto']:.2f} ({row['auto'] / row['rates'][best]:.2f}) {row['auto_splits']} "
                          + " ".join(f"{s}:{r:.2f}" for s, r in row["rates"].items()), flush=True)
    with open(args.out, "w") as f:
        json.dump({"environment": common.environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
