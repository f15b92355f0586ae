"""Decode benchmark: fa2rt.attention_with_kvcache (the split-KV decode kernels) against a device-to-device copy and
PyTorch SDPA's flash, efficient and cuDNN backends on the same decode step, measured in the same process.

    python ci/bench_decode.py [--batch 1,8,64] [--cache 1024,4096,8192,32768] [--heads 32/8,32/32] [--head-dim 128]
                              [--layouts contiguous,paged16,paged64,paged256] [--append] [--out FILE.json]

Each point is one decode step (seqlen_q 1, bf16, every sequence holding `cache` tokens): bytes moved = K + V read
(batch * cache * nheads_k * headdim * 2 tensors * 2 bytes) + q read + out written; rates in TB/s = bytes / median
time (triton.testing.do_bench, which flushes L2 before each call). The copy's rate counts its read and its write.
SDPA gets the same K/V as (batch, nheads_k, cache, headdim) views with enable_gqa=True; a backend that refuses the
call is reported as null. --append also writes one new token per sequence (k, v given) in every fa2rt call.
Every run records the device, driver, torch, Triton and the date.
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fa2rt
from fa2rt.bench import environment, time_ms

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}
MAX_BYTES = 48 << 30  # skip points whose caches would exceed this


def copy_rate(nbytes=1 << 30) -> float:
    """Device-to-device copy rate in TB/s (read + write)."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x))
    return 2 * nbytes / ms / 1e9


def make_point(batch, cache, h, hk, d, layout, append):
    dtype, dev = torch.bfloat16, "cuda"
    new = 1 if append else 0
    capacity = cache + new
    page = int(layout.removeprefix("paged")) if layout.startswith("paged") else 0
    q = torch.randn(batch, 1, h, d, dtype=dtype, device=dev)
    if page:
        blocks = -(-capacity // page)
        pool = batch * blocks
        k_cache = torch.randn(pool, page, hk, d, dtype=dtype, device=dev)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(pool, device=dev).reshape(batch, blocks).to(torch.int32)
        extra = {"block_table": table}
    else:
        k_cache = torch.randn(batch, capacity, hk, d, dtype=dtype, device=dev)
        v_cache = torch.randn_like(k_cache)
        extra = {}
    seqlens = torch.full((batch,), cache, dtype=torch.int32, device=dev)
    if append:  # the new token lands at position `cache`, then `cache + 1` keys are read
        extra |= {"k": torch.randn(batch, 1, hk, d, dtype=dtype, device=dev),
                  "v": torch.randn(batch, 1, hk, d, dtype=dtype, device=dev)}
    return q, k_cache, v_cache, dict(cache_seqlens=seqlens, causal=True, **extra)


def sdpa_time(q, k, v, backend):
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    try:
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
            return time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
    except RuntimeError:
        return None


def bench_point(batch, cache, h, hk, d, layout, append):
    q, k_cache, v_cache, kw = make_point(batch, cache, h, hk, d, layout, append)
    decision = fa2rt.explain_with_kvcache(q, k_cache, v_cache, **kw)
    ms = time_ms(lambda: fa2rt.attention_with_kvcache(q, k_cache, v_cache, **kw))
    keys = cache + (1 if append else 0)
    nbytes = 2 * batch * keys * hk * d * 2 + 2 * batch * h * d * 2
    row = {"batch": batch, "cache": cache, "nheads": h, "nheads_k": hk, "head_dim": d, "layout": layout,
           "append": append, "path": decision.path, "image": decision.image, "splits": decision.message,
           "ms": ms, "tbps": nbytes / ms / 1e9}
    if layout == "contiguous":
        k, v = k_cache[:, :keys], v_cache[:, :keys]
        for name, backend in SDPA_BACKENDS.items():
            t = sdpa_time(q, k, v, backend)
            row[f"sdpa_{name}_ms"] = t
            row[f"sdpa_{name}_tbps"] = None if t is None else nbytes / t / 1e9
    return row


def ints(text):
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=ints, default=[1, 8, 64])
    p.add_argument("--cache", type=ints, default=[1024, 4096, 8192, 32768])
    p.add_argument("--heads", default="32/8,32/32", help="nheads/nheads_k pairs, comma-separated")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layouts", default="contiguous,paged16,paged64,paged256")
    p.add_argument("--append", action="store_true", help="append one token per sequence in each fa2rt call")
    p.add_argument("--out", help="write the results (environment, copy rate, rows) as JSON here")
    args = p.parse_args(argv)
    heads = [tuple(int(x) for x in pair.split("/")) for pair in args.heads.split(",")]
    env = environment()
    copy = copy_rate()
    print(f"{env['device']} driver {env['driver']} torch {env['torch']} triton {env['triton']} {env['date']}")
    print(f"device copy: {copy:.2f} TB/s (read + write)")
    header = (f"{'batch':>5} {'cache':>6} {'heads':>6} {'layout':>10} {'TB/s':>6} {'copy%':>6} {'flash':>6} "
              f"{'effic':>6} {'cudnn':>6}  image")
    print(header)
    rows = []
    for h, hk in heads:
        for batch in args.batch:
            for cache in args.cache:
                if 2 * batch * cache * hk * args.head_dim * 2 > MAX_BYTES:
                    continue
                for layout in args.layouts.split(","):
                    row = bench_point(batch, cache, h, hk, args.head_dim, layout, args.append)
                    rows.append(row)
                    torch.cuda.empty_cache()  # the point's caches are gone: give their memory back

                    def rate(name, row=row):
                        value = row.get(f"sdpa_{name}_tbps")
                        return "   n/a" if value is None else f"{value:6.2f}"

                    print(f"{batch:>5} {cache:>6} {h:>3}/{hk:<2} {layout:>10} {row['tbps']:6.2f} "
                          f"{100 * row['tbps'] / copy:5.1f}% {rate('flash')} {rate('efficient')} {rate('cudnn')}  "
                          f"{row['image'] or row['path']} ({row['splits']})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "copy_tbps": copy, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
