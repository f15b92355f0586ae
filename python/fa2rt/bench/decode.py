"""--decode: fa2rt.attention_with_kvcache (the split-KV decode kernels) against a device-to-device copy and SDPA's
flash, efficient and cuDNN backends on the same decode step, measured in the same process.

Each point is one decode step (seqlen_q 1, bf16, causal, every sequence holding `cache` tokens) over batch
(--decode-batch) x cache length (--decode-cache) x nheads/nheads_k (--decode-heads) x head dim (--decode-head-dim) x
layout (--decode-layouts: contiguous, or paged<page size>, the pages of each sequence scattered through the pool by a
random block table). Default: issue 17's grid at head dim 128 (batch 1 8 32 64, cache 4k 8k 32k 128k, GQA 32/8 and
MHA 32/32, contiguous and pages of 16, 64, 256); --full adds head dim 64; --quick is a smoke run. Points whose K and V
exceed --decode-max-gib are skipped (listed in the output). Bytes moved = K + V read (batch * cache * nheads_k *
headdim * 2 tensors * 2 bytes) + q read + out written; rates in TB/s = bytes / median time. The copy's rate counts
its read and its write. SDPA gets the same K/V as (batch, nheads_k, cache, headdim) views with enable_gqa=True,
contiguous points only; a backend that refuses the call is reported as null. --decode-append also writes one new
token per sequence (k, v given) in every fa2rt call. --decode-graphs times every contender (fa2rt and each SDPA
backend) as a CUDA graph replay of its call, as serving loops run decode steps: the kernels without host time (the
eager default counts the host's time wherever it exceeds the kernels'). Every point is timed in --decode-rounds rounds
(default DECODE_ROUNDS) in which its contenders take turns call by call: a row keeps each one's median round and every
round's time, and the SDPA bar takes the median over rounds of the ratio within a round. Writes decode-<tag>.json
(environment, copy rate, rows, issue 17's bars: bar_checks; settings.timing says which timing)."""

import functools
import sys

import torch

from .. import api
from . import common

DECODE_BATCHES = (1, 8, 32, 64)
DECODE_CACHES = (4096, 8192, 32768, 131072)
DECODE_HEADS = ("32/8", "32/32")
DECODE_HEAD_DIMS = (128,)
DECODE_LAYOUTS = ("contiguous", "paged16", "paged64", "paged256")
DECODE_MAX_GIB = 48  # skip points whose caches would exceed this
DECODE_ROUNDS = 3  # rounds per point (the contenders take turns within each; the SDPA bar pairs them)
DECODE_DTYPE = "bfloat16"
COPY_BYTES = 1 << 30  # the device copy's size
SDPA_BACKENDS = ("flash", "efficient", "cudnn")


def parse_heads(text: str) -> tuple[int, int]:
    """'32/8' -> (32, 8): nheads / nheads_k, nheads a positive multiple of nheads_k."""
    try:
        h, hk = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--decode-heads: expected NHEADS/NHEADS_K such as 32/8, got {text!r}") from None
    if h <= 0 or hk <= 0 or h % hk:
        raise ValueError(f"--decode-heads: expected positive nheads divisible by nheads_k, got {text!r}")
    return h, hk


def page_size(layout: str) -> int:
    """0 for contiguous, N for pagedN (a positive multiple of 16, as attention_with_kvcache takes)."""
    if layout == "contiguous":
        return 0
    size = layout.removeprefix("paged")
    if not layout.startswith("paged") or not size.isdigit() or int(size) <= 0 or int(size) % 16:
        raise ValueError(f"--decode-layouts: expected contiguous or pagedN with N a positive multiple of 16, got "
                         f"{layout!r}")
    return int(size)


def cache_bytes(batch, cache, hk, d, append=False) -> int:
    """Bytes of K and V of one point (bf16)."""
    return 2 * batch * (cache + (1 if append else 0)) * hk * d * 2


def moved_bytes(batch, keys, h, hk, d) -> int:
    """Bytes one decode step moves: K + V read, q read, out written (bf16)."""
    return 2 * batch * keys * hk * d * 2 + 2 * batch * h * d * 2


def copy_rate(warmup=25, rep=100, nbytes=None) -> float:
    """Device-to-device copy rate in TB/s (read + write)."""
    nbytes = COPY_BYTES if nbytes is None else nbytes
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=common.DEVICE).normal_()
    y = torch.empty_like(x)
    ms = common.time_ms(lambda: y.copy_(x), warmup=warmup, rep=rep)
    return 2 * nbytes / ms / 1e9


def make_point(batch, cache, h, hk, d, layout, append):
    """q, k_cache, v_cache and attention_with_kvcache's keyword arguments of one point."""
    dtype, dev = getattr(torch, DECODE_DTYPE), common.DEVICE
    capacity = cache + (1 if append else 0)
    page = page_size(layout)
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


def timed(fn, graphs: bool):
    """What measure_together() times for the call fn: fn itself, or the replay of its CUDA graph."""
    return common.graphed(fn) if graphs else fn


def graphed_rate(q, k_cache, v_cache, kw, nbytes) -> float:
    """TB/s of one attention_with_kvcache call (kw: its keyword arguments) timed as a CUDA graph replay."""
    def step():
        return api.attention_with_kvcache(q, k_cache, v_cache, **kw)
    return nbytes / common.time_ms(common.graphed(step)) / 1e9


def sdpa_decode(q, k, v, name):
    """SDPA's `name` backend on one decode step, (batch, seqlen, heads, d) inputs as transposed views."""
    from torch.nn.attention import sdpa_kernel

    backend = common.sdpa_backend(f"sdpa_{name}")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def run():
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
    return run


def bench_point(batch, cache, h, hk, d, layout, append, warmup=25, rep=100, graphs=False, rounds=1) -> dict:
    """One row: fa2rt's time and rate (or its error), and SDPA's per backend on contiguous points, each the median of
    `rounds` rounds in which they take turns, with every round's time (rounds_ms); graphs: each timed as a CUDA graph
    replay (captured once)."""
    q, k_cache, v_cache, kw = make_point(batch, cache, h, hk, d, layout, append)
    try:
        decision = api.explain_with_kvcache(q, k_cache, v_cache, **kw)
        path, image, splits = decision.path, decision.image, decision.message
    except Exception as exc:
        path, image, splits = "error", None, common.error_text(exc)
    keys = cache + (1 if append else 0)
    nbytes = moved_bytes(batch, keys, h, hk, d)
    prepares = {"fa2rt": lambda: timed(lambda: api.attention_with_kvcache(q, k_cache, v_cache, **kw), graphs)}
    if layout == "contiguous":
        k, v = k_cache[:, :keys], v_cache[:, :keys]
        prepares |= {name: (lambda name=name: timed(sdpa_decode(q, k, v, name), graphs)) for name in SDPA_BACKENDS}
    prepares = {name: functools.cache(prepare) for name, prepare in prepares.items()}  # one graph for every round
    results = common.merged_rounds([common.measure_together(prepares, nbytes, warmup, rep, unit="tbps")
                                    for _ in range(rounds)])
    res = results.pop("fa2rt")
    row = {"batch": batch, "cache": cache, "nheads": h, "nheads_k": hk, "head_dim": d, "layout": layout,
           "append": append, "path": path, "image": image, "splits": splits, "ms": res.get("ms"),
           "tbps": res.get("tbps"), "rounds_ms": res.get("rounds_ms")}
    if "error" in res:
        row["error"] = res["error"]
    for name, sdpa in results.items():
        row |= {f"sdpa_{name}_{field}": sdpa.get(field) for field in ("ms", "tbps", "rounds_ms")}
    return row


def points(args):
    """(batch, cache, h, hk, d, layout) of the grid in run order, and the skipped ones (over the memory cap)."""
    run, skipped = [], []
    cap = args.decode_max_gib * (1 << 30)
    for d in args.decode_head_dim:
        for h, hk in map(parse_heads, args.decode_heads):
            for batch in args.decode_batch:
                for cache in args.decode_cache:
                    target = skipped if cache_bytes(batch, cache, hk, d, args.decode_append) > cap else run
                    target.extend((batch, cache, h, hk, d, layout) for layout in args.decode_layouts)
    return run, skipped


# Issue 17's bars (bar_checks): share of the copy rate, speed over the best SDPA backend, paged rate over contiguous.
COPY_BAR, SDPA_BAR, PAGED_BAR, PAGED16_BAR = 0.85, 1.0, 0.9, 0.7


def _point(row) -> tuple:
    return row["batch"], row["cache"], row["nheads"], row["nheads_k"], row["head_dim"], row["append"]


def bar_checks(rows, copy) -> list[dict]:
    """Per bar: {"name", "bar", "n", "min", "at", "met"} over the rows it applies to where both figures exist
    (met: every one reaches the bar; None when none was measured)."""
    contiguous = {_point(r): r for r in rows if r["layout"] == "contiguous"}

    def rate_over_contiguous(r):
        c = contiguous.get(_point(r))
        return r["tbps"] / c["tbps"] if c and c["tbps"] and r["tbps"] else None

    def over_best_sdpa(r):
        theirs = [r[f"sdpa_{n}_rounds_ms"] for n in SDPA_BACKENDS if r.get(f"sdpa_{n}_rounds_ms")]
        return common.paired_ratio(theirs, r["rounds_ms"]) if theirs and r.get("rounds_ms") else None

    def copy_share(r):
        return r["tbps"] / copy if r["tbps"] and copy else None

    checks = (
        ("contiguous at batch 1 with cache >= 32k and batch >= 8 with cache >= 8k: share of the copy rate", COPY_BAR,
         lambda r: r["layout"] == "contiguous" and ((r["batch"] == 1 and r["cache"] >= 32768)
                                                    or (r["batch"] >= 8 and r["cache"] >= 8192)), copy_share),
        ("contiguous: best SDPA backend's time / fa2rt's (round by round, median)", SDPA_BAR,
         lambda r: r["layout"] == "contiguous", over_best_sdpa),
        ("paged, pages >= 64: rate / contiguous rate", PAGED_BAR,
         lambda r: r["layout"] != "contiguous" and page_size(r["layout"]) >= 64, rate_over_contiguous),
        ("paged, pages of 16: rate / contiguous rate", PAGED16_BAR, lambda r: r["layout"] == "paged16",
         rate_over_contiguous))
    out = []
    for name, bar, applies, figure in checks:
        values = [(figure(r), r) for r in rows if applies(r)]
        values = [(x, r) for x, r in values if x is not None]
        low, at = min(values, key=lambda v: v[0]) if values else (None, None)
        out.append({"name": name, "bar": bar, "n": len(values), "min": low,
                    "at": None if at is None else f"b{at['batch']} cache {at['cache']} {at['nheads']}/"
                                                  f"{at['nheads_k']} d{at['head_dim']} {at['layout']}",
                    "met": None if low is None else low >= bar})
    return out


def bars_table(records) -> str:
    lines = ["decode bars (issue 17):"]
    for b in records:
        state = {True: "met", False: "NOT MET", None: "not measured"}[b["met"]]
        where = f" at {b['at']}" if b["at"] else ""
        lines.append(f"  {b['name']}: min {common.num(b['min'], 0)}{where} over {b['n']} points "
                     f"(bar >= {b['bar']}): {state}")
    return "\n".join(lines)


def header() -> str:
    return (f"{'batch':>5} {'cache':>6} {'heads':>6} {'d':>4} {'layout':>10} {'TB/s':>6} {'copy%':>6} {'flash':>6} "
            f"{'effic':>6} {'cudnn':>6}  image")


def row_line(row, copy) -> str:
    def rate(value):
        return "   n/a" if value is None else f"{value:6.2f}"

    fa2rt = (f"{rate(row['tbps'])} {100 * row['tbps'] / copy:5.1f}%" if row["tbps"] is not None
             else f"{'err':>6} {'-':>6}")
    tail = row.get("error") or f"{row['image'] or row['path']} ({row['splits']})"
    return (f"{row['batch']:>5} {row['cache']:>6} {row['nheads']:>3}/{row['nheads_k']:<2} {row['head_dim']:>4} "
            f"{row['layout']:>10} {fa2rt} {rate(row.get('sdpa_flash_tbps'))} {rate(row.get('sdpa_efficient_tbps'))} "
            f"{rate(row.get('sdpa_cudnn_tbps'))}  {tail}")


def run(args, env, settings, path) -> int:
    """Measures the copy and the grid, prints a line per point, writes path (decode-<tag>.json); 1 when an fa2rt
    call meant to run a kernel raised."""
    copy = copy_rate(args.warmup_ms, args.rep_ms)
    print(f"{env['device']} driver {env['driver']} torch {env['torch']} triton {env['triton']} {env['date']}")
    print(f"device copy: {copy:.2f} TB/s (read + write); timing: "
          f"{'CUDA graph replays' if args.decode_graphs else 'eager calls'}")
    todo, skipped = points(args)
    print(header(), flush=True)
    rows = []
    for point in todo:
        rows.append(bench_point(*point, args.decode_append, args.warmup_ms, args.rep_ms, args.decode_graphs,
                                args.decode_rounds))
        common.recover()  # the point's caches are gone: give their memory back
        print(row_line(rows[-1], copy), flush=True)
    skipped_points = [dict(zip(("batch", "cache", "nheads", "nheads_k", "head_dim", "layout"), p, strict=True))
                      for p in skipped]
    if skipped:
        print(f"skipped {len(skipped)} points over {args.decode_max_gib} GiB of K and V: " + ", ".join(
            sorted({f"b{b} cache {c} {h}/{hk} d{d}" for b, c, h, hk, d, _ in skipped})))
    records = bar_checks(rows, copy)
    print(bars_table(records), flush=True)
    common.write_json(path, {"environment": env, "copy_tbps": copy, "rows": rows, "settings": {
        **settings, "dtype": DECODE_DTYPE, "max_gib": args.decode_max_gib, "append": args.decode_append,
        "rounds": args.decode_rounds, "timing": "cuda graph replay" if args.decode_graphs else "eager calls"},
        "skipped": skipped_points, "bars": records})
    errors = [r for r in rows if "error" in r and r["path"] != "fallback"]
    for r in errors:
        print(f"fa2rt decode error: b{r['batch']} cache {r['cache']} {r['layout']}: {r['error']}", file=sys.stderr)
    return 1 if errors else 0
