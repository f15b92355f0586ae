"""Tile tuning on a GPU: which (block_m, block_n, warps, stages) each arch, op and head-dim bucket should build.

    python backends/kernels/tune.py --archs sm90,sm80,sm89 --out DIR [--op fwd] [--buckets 64,128] [--write]
                                    [--tiles M,N,WARPS,STAGES;...] [--max-stack-bytes N] [--band full]
    python backends/kernels/tune.py --op decode --archs sm90 --buckets 64,128 --out DIR [--write]
                                    [--decode-points BATCH,CACHE,H,HK,LAYOUT[,SPLITS];...]
    python backends/kernels/tune.py --op decode_combine --archs sm90 --buckets 128 --tiles M,N,WARPS,1;... --out DIR

For every arch, bucket and candidate tile of the op, builds every image kind of the bucket (variants.KINDS; a tile
only counts if all of them pass the AOT static checks: no spills (or at most --max-stack-bytes), shared memory within
the arch's limit), then times the plain exact image through fa2rt.attention on bf16 problems of the FA2 grid (16k
tokens, hidden 2048), causal and not: the forward call for fwd; for a backward op, the backward call
(torch.autograd.grad), with the other kernels on their current tiles.
Older archs run on the local GPU through their PTX (FA2RT_FORCE_ARCH), which ranks tiles by that GPU's behaviour,
not the older part's. Prints the best tile per (arch, bucket); --write stores the winners in the vendor's tiles.json.
For decode (memory-bound, 16 packed query rows per program), every layout's kind is built with the candidate tile
(contiguous, page-aligned paged and paged; --write leaves an entry's "page_aligned" and "one_split" tiles as they
are) and timed
through fa2rt.attention_with_kvcache on DECODE_POINTS (or --decode-points; SPLITS fixes num_splits, else the
heuristic chooses), contiguous and paged (a stage more measured 4% faster on
contiguous caches and 8-27% slower on paged ones), each call a CUDA graph replay (the kernels without host time), in
TB/s of K and V read. --op decode_combine times the split merge's tiles (block_m rows of a sequence per program,
block_n splits per step) the same way, the decode images on their current tiles.
The entry's own tile always competes ("own tile" column). With --band full only calls without causal or window are
timed, the entry's full-band tile competes too, and --write stores a winner as the entry's full-band tile
(variants.FULL_BAND) where it beats the entry's own tile by FULL_BAND_MIN_GAIN, and drops it where it does not.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aot  # noqa: E402
import variants  # noqa: E402

# Candidate tiles (block_m, block_n, num_warps, num_stages) per op and vendor; the static checks prune what cannot
# build.
CANDIDATES = {
    "fwd": {
        "cuda": [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                 (128, 64, 8, 4), (128, 32, 8, 3), (128, 32, 4, 3), (64, 128, 4, 2), (64, 128, 4, 3), (64, 64, 4, 2),
                 (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 2), (64, 32, 4, 3), (64, 32, 4, 4), (64, 32, 8, 2),
                 (32, 64, 4, 3)],
        "rocm": [(128, 64, 4, 1), (128, 32, 4, 1), (64, 64, 4, 1), (64, 32, 8, 1), (64, 32, 4, 1)],
    },
    "bwd_dq": {"cuda": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 64, 8, 3), (64, 128, 4, 2),
                        (128, 64, 8, 1), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)]},
    "decode": {"cuda": [(16, 32, 4, 2), (16, 32, 4, 4), (16, 64, 4, 3), (16, 64, 4, 4), (16, 64, 2, 3),
                        (16, 64, 8, 3), (16, 128, 4, 2), (16, 128, 4, 3), (16, 128, 8, 2), (16, 128, 8, 3),
                        (16, 256, 8, 2)]},
    # The merge: (rows per program, splits per step, warps, 1).
    "decode_combine": {"cuda": [(1, 16, 4, 1), (1, 32, 4, 1), (1, 32, 8, 1), (1, 64, 8, 1)]},
    "bwd_dkdv": {"cuda": [(32, 128, 8, 1), (32, 128, 8, 2), (64, 128, 8, 1), (32, 64, 8, 1), (32, 64, 8, 2),
                          (64, 64, 8, 1), (64, 64, 8, 2), (16, 128, 8, 1), (64, 64, 4, 1), (32, 64, 4, 1),
                          (32, 64, 4, 2), (16, 64, 4, 1)]},
}
SEQLENS = (1024, 4096)
DECODE_OPS = ("decode", "decode_combine")  # timed on decode steps (DECODE_POINTS), each with the other's images
# Whether the timed calls are causal, per --band: every call, or only those a full-band tile serves.
BANDS = {"any": (False, True), "full": (False,)}
# Decode steps timed per tile (batch, cache length, nheads, nheads_k, layout as fa2rt.bench --decode names it): one
# sequence (the split regime) and batches, GQA and MHA, contiguous and paged; TB/s of K and V read, geomean over them.
DECODE_POINTS = ((1, 4096, 32, 8, "contiguous"), (1, 32768, 32, 8, "contiguous"), (1, 32768, 32, 32, "contiguous"),
                 (8, 8192, 32, 8, "contiguous"), (32, 8192, 32, 8, "contiguous"), (64, 32768, 32, 8, "contiguous"),
                 (1, 32768, 32, 8, "paged16"), (8, 8192, 32, 8, "paged64"), (64, 8192, 32, 8, "paged16"),
                 (32, 8192, 32, 32, "paged256"))
# A full-band tile adds every image kind of its bucket to the build; it must earn them by at least this speedup.
FULL_BAND_MIN_GAIN = 1.03


def _tile(cfg: dict) -> tuple[int, int, int, int]:
    return cfg["block_m"], cfg["block_n"], cfg["num_warps"], cfg["num_stages"]


def current_tiles(arch: str, bucket: int, op: str) -> dict:
    """{tile: its tiles.json entry} of the bucket: the entry's own tile first, then its full-band tile if any."""
    cfg = variants.tile_config(arch, op, bucket)
    return {_tile(c): c for c in (cfg, cfg.get(variants.FULL_BAND)) if c}


def candidate_variants(arch: str, bucket: int, op: str, tiles: list | None = None, max_stack_bytes: int = 0,
                       band: str = "any") -> list[tuple[tuple, list]]:
    """[(tile, its image kinds)] to build: the given tiles (default: the op's candidates), then the entry's own tile
    (with band "full" its full-band tile too), so the current choice is timed in the same run. A current tile keeps
    its entry's matrix-core instruction and at least its spill allowance. Every tile takes the bucket entry's
    waves_per_eu (AMD; the first bucket's may differ)."""
    layouts = _layout_kinds(op)
    base = next(v for v in variants.variants([arch]) if v.op == op and not v.full_band_only and not v.one_split
                and v.layout == layouts[0][0])
    base = dataclasses.replace(base, waves_per_eu=variants.tile_config(arch, op, bucket).get("waves_per_eu"))
    current = list(current_tiles(arch, bucket, op).items())
    current = dict(current if band == "full" else current[:1])
    tiles = list(dict.fromkeys([*(tiles or CANDIDATES[op].get(base.vendor, [])), *current]))
    out = []
    for m, n, w, s in tiles:
        entry = current.get((m, n, w, s), {})
        stack = max(max_stack_bytes, entry.get("max_stack_bytes", 0))
        # Decode's 16-row tiles run mma.sync everywhere and the merge has no matrix product: every candidate takes
        # the bucket entry's instruction.
        owner = variants.tile_config(arch, op, bucket) if op in DECODE_OPS else entry
        instr = owner.get("mma_instr", variants.ARCHS[arch][3])
        kinds = [dataclasses.replace(base, dtype="bf16", head_dim=bucket, d_mask=d_mask, features=features,
                                     block_m=m, block_n=n, num_warps=w, num_stages=s, max_stack_bytes=stack,
                                     mma_instr=instr, layout=layout, page_aligned=aligned)
                 for layout, d_mask, features, aligned in layouts]
        out.append(((m, n, w, s), kinds))
    return out


def _layout_kinds(op: str) -> list[tuple[str, bool, tuple, bool]]:
    """(layout, d_mask, features, page_aligned) of every image a candidate tile must build, the timed one first: the
    dense kinds, or for decode its one kind in each cache layout, the paged one also page-aligned (listed first, as
    variants.variants lists it), so the timed paged points run the images the dispatcher would pick."""
    if op not in DECODE_OPS:
        return [("dense", d_mask, features, False) for d_mask, features in variants.KINDS]
    return [(layout, d_mask, features, aligned) for layout, kinds in variants.OP_LAYOUT_KINDS[op].items()
            for d_mask, features in kinds
            for aligned in ((True, False) if op in variants.PAGE_ALIGNED_OPS and layout == "paged" else (False,))]


def _build(args):
    v, out = args
    out.mkdir(parents=True, exist_ok=True)
    return aot.build_image(v, out)


def _companions(arch: str, bucket: int, op: str) -> list:
    """The plain exact images of the other ops a timed call needs, on their current tiles: a backward call runs
    the forward and both backward kernels."""
    if op == "fwd":
        return []
    if op in DECODE_OPS:  # the other of the decode kernel and the merge of its split partials, at the bucket
        return [v for v in variants.variants([arch]) if v.op in DECODE_OPS and v.op != op and v.dtype == "bf16"
                and v.head_dim == bucket]
    return [v for v in variants.variants([arch]) if v.op != op and v.head_dim == bucket and v.dtype == "bf16"
            and (v.d_mask, v.features) == variants.KINDS[0] and v.layout == "dense"]


def build_all(arch: str, buckets: list[int], root: Path, jobs: int, op: str, tiles: list | None = None,
              max_stack_bytes: int = 0, band: str = "any") -> dict:
    """{(bucket, tile): (folder with a manifest of that tile's plain image and its companions, the largest stack
    frame of the tile's kinds), or the static-check failures}."""
    cands = [(b, tile, kinds) for b in buckets
             for tile, kinds in candidate_variants(arch, b, op, tiles, max_stack_bytes, band)]
    work = [(v, root / f"{op}-{arch}-d{b}-m{t[0]}n{t[1]}w{t[2]}s{t[3]}") for b, t, kinds in cands for v in kinds]
    fixed = [(v, root / f"companions-{arch}-d{b}") for b in buckets for v in _companions(arch, b, op)]
    with ProcessPoolExecutor(jobs) as pool:
        results = iter(pool.map(_build, work + fixed))
    cand_results = [next(results) for _ in work]
    companion_rows = {}
    for v, folder in fixed:
        row, fails, _ = next(results)
        if fails:
            raise RuntimeError(f"companion image {v.name} fails the static checks: {fails}")
        companion_rows.setdefault(folder.name, []).append(row)
    built, results = {}, iter(cand_results)
    for i, (b, tile, kinds) in enumerate(cands):
        rows_fails = [next(results)[:2] for _ in kinds]
        fails = [f for _, fs in rows_fails for f in fs]
        folder = work[i * len(kinds)][1]
        if fails:
            built[(b, tile)] = fails
        else:
            # Every kind's image is listed (the dispatcher takes the first that fits: the plain exact one for the
            # timed calls; for decode the one of the call's cache layout); companion files are copied next to them.
            companions = f"companions-{arch}-d{b}"
            for row in companion_rows.get(companions, []):
                for kind in ("binary", "ptx"):
                    if row.get(kind):
                        name = row[kind]["file"]
                        (folder / name).write_bytes((root / companions / name).read_bytes())
            aot.write_manifest(folder, [row for row, _ in rows_fails] + companion_rows.get(companions, []))
            built[(b, tile)] = (folder, max(row["resources"].get("stack_bytes", 0) for row, _ in rows_fails))
    return built


def _use_images(folder: Path, arch: str) -> None:
    """fa2rt loads only the images in folder, on the local GPU as `arch` (through PTX for an older arch)."""
    import torch

    import fa2rt.devices

    os.environ["FA2RT_KERNEL_DIR"] = str(folder)
    info, code, why = fa2rt.devices.describe(torch.device("cuda", torch.cuda.current_device()))
    if code:
        raise RuntimeError(f"no usable GPU: {why}")
    if arch != info.arch:
        os.environ["FA2RT_FORCE_ARCH"] = arch
    else:
        os.environ.pop("FA2RT_FORCE_ARCH", None)
    os.environ["FA2RT_MIN_SEQLEN"] = "0"


def time_decode_tile(folder: Path, arch: str, bucket: int, points=DECODE_POINTS) -> dict:
    """{point: TB/s of K and V read} of the tile's decode images, each call a CUDA graph replay."""
    from triton.testing import do_bench

    import fa2rt
    from fa2rt.bench import decode
    from fa2rt.bench.common import graphed

    _use_images(folder, arch)
    rates = {}
    for batch, cache, h, hk, layout, *splits in points:
        q, k_cache, v_cache, kw = decode.make_point(batch, cache, h, hk, bucket, layout, append=False)
        kw |= {"num_splits": splits[0]} if splits else {}
        decision = fa2rt.explain_with_kvcache(q, k_cache, v_cache, **kw)
        if decision.path != "kernel":
            raise RuntimeError(f"{folder.name}: not the kernel path: {decision}")
        call = graphed(lambda: fa2rt.attention_with_kvcache(q, k_cache, v_cache, **kw))  # noqa: B023
        ms = do_bench(call, warmup=10, rep=40, return_mode="median")
        name = f"b{batch}-n{cache}-{h}/{hk}-{layout}" + (f"-s{splits[0]}" if splits else "")
        rates[name] = decode.cache_bytes(batch, cache, hk, bucket) / ms / 1e9
    return rates


def time_tile(folder: Path, arch: str, bucket: int, op: str, band: str = "any", points=DECODE_POINTS) -> dict:
    import torch
    from triton.testing import do_bench

    import fa2rt
    from fa2rt.bench.common import HIDDEN, TOKENS, fwd_flops

    if op in DECODE_OPS:
        return time_decode_tile(folder, arch, bucket, points)
    backward = op != "fwd"
    _use_images(folder, arch)
    times = {}
    for causal in BANDS[band]:
        for seqlen in SEQLENS:
            batch, nheads = TOKENS // seqlen, max(1, HIDDEN // bucket)
            q, k, v = (torch.randn(batch, seqlen, nheads, bucket, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=backward) for _ in range(3))
            decision = fa2rt.explain(q, k, v, causal=causal)
            if decision.path != "kernel":
                raise RuntimeError(f"{folder.name}: not the kernel path: {decision}")
            if backward:
                out = fa2rt.attention(q, k, v, causal=causal)
                dout = torch.randn_like(out)
                call = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: B023, E731
            else:
                call = lambda: fa2rt.attention(q, k, v, causal=causal)  # noqa: B023, E731
            ms = do_bench(call, warmup=10, rep=40, return_mode="median")
            flops = fwd_flops(batch, nheads, seqlen, bucket, causal) * (2.5 if backward else 1.0)
            times[f"{'causal' if causal else 'full'}-{seqlen}"] = flops / ms / 1e9
    return times


def parse_tiles(text: str) -> list[tuple[int, int, int, int]]:
    tiles = [tuple(int(x) for x in t.split(",")) for t in text.split(";") if t]
    if not tiles or any(len(t) != 4 for t in tiles):
        raise argparse.ArgumentTypeError(f"--tiles: expected M,N,WARPS,STAGES;... got {text!r}")
    return tiles


def parse_decode_points(text: str) -> list[tuple]:
    """BATCH,CACHE,H,HK,LAYOUT[,SPLITS];... as DECODE_POINTS holds them, SPLITS appended where given."""
    points = []
    for item in filter(None, text.split(";")):
        fields = item.split(",")
        if len(fields) not in (5, 6):
            raise argparse.ArgumentTypeError(f"--decode-points: expected BATCH,CACHE,H,HK,LAYOUT[,SPLITS] got {item!r}")
        points.append((*map(int, fields[:4]), fields[4], *map(int, fields[5:])))
    return points


def main(argv=None) -> int:
    from fa2rt.bench.common import geomean

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="sm90,sm80,sm89")
    p.add_argument("--op", default="fwd", choices=variants.OPS)
    p.add_argument("--buckets", default="16,32,64,128,256")
    p.add_argument("--tiles", type=parse_tiles, help="candidates instead of the op's list: M,N,WARPS,STAGES;...")
    p.add_argument("--max-stack-bytes", type=int, default=0,
                   help="accept tiles that spill up to this many bytes (a winner that does is stored with it)")
    p.add_argument("--band", choices=BANDS, default="any",
                   help="full: tune the full-band tile (calls without causal or window) against the entry's own")
    p.add_argument("--decode-points", type=parse_decode_points, default=DECODE_POINTS,
                   help="decode steps to time instead of DECODE_POINTS: BATCH,CACHE,H,HK,LAYOUT[,SPLITS];...")
    p.add_argument("--out", type=Path, required=True, help="folder for tune.json")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--write", action="store_true", help="store the winning tiles in backends/<vendor>/tiles.json")
    args = p.parse_args(argv)
    buckets = [int(b) for b in args.buckets.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results, winners, own = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="fa2rt-tune-") as tmp:
        os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        for arch in args.archs.split(","):
            built_all = build_all(arch, buckets, Path(tmp), args.jobs, args.op, args.tiles, args.max_stack_bytes,
                                  args.band)
            for (bucket, tile), built in built_all.items():
                row = {"arch": arch, "op": args.op, "band": args.band, "bucket": bucket, "tile": tile}
                if isinstance(built, list):
                    row["failed"] = built
                else:
                    folder, row["stack_bytes"] = built
                    unit_key = "tbps" if args.op in DECODE_OPS else "tflops"
                    row[unit_key] = time_tile(folder, arch, bucket, args.op, args.band, args.decode_points)
                    row["geomean"] = geomean(row[unit_key].values())
                    if tile == next(iter(current_tiles(arch, bucket, args.op))):
                        own[(arch, bucket)] = row
                    best = winners.get((arch, bucket))
                    if best is None or row["geomean"] > best["geomean"]:
                        winners[(arch, bucket)] = row
                results.append(row)
                print(json.dumps(row), flush=True)
    (args.out / "tune.json").write_text(json.dumps(results, indent=1))
    unit = "TB/s" if args.op in DECODE_OPS else "TFLOP/s"
    print(f"{'arch':7}{'bucket':>7}  {'tile (m, n, warps, stages)':28}{'geomean ' + unit:>16}{'own tile':>10}")
    for (arch, bucket), row in sorted(winners.items()):
        mine = own.get((arch, bucket))
        print(f"{arch:7}{bucket:>7}  {str(row['tile']):28}{row['geomean']:16.1f}"
              f"{mine['geomean'] if mine else float('nan'):10.1f}")
    if args.write and args.band == "full":
        write_full_band_tiles(winners, own, args.op)
    elif args.write:
        write_tiles(winners, args.op)
    return 0


def _tile_entry(row: dict) -> dict:
    m, n, w, s = row["tile"]
    cfg = {"block_m": m, "block_n": n, "num_warps": w, "num_stages": s}
    return cfg | ({"max_stack_bytes": row["stack_bytes"]} if row["stack_bytes"] else {})


def _update_tiles(winners: dict, op: str, update) -> None:
    """update(tiles.json entry, winner row) for each (arch, bucket) winner, in its vendor's tiles.json."""
    for vendor in ("cuda", "rocm"):
        path = variants.BACKENDS_DIR / vendor / "tiles.json"
        doc = json.loads(path.read_text())
        mine = [((arch, bucket), row) for (arch, bucket), row in winners.items() if arch in doc["archs"]]
        for (arch, bucket), row in mine:
            update(doc["archs"][arch][op][str(bucket)], row)
        if mine:
            path.write_text(variants.dump_tiles(doc))


def write_tiles(winners: dict, op: str) -> None:
    def update(cfg, row):
        if tuple(row["tile"]) != _tile(cfg) and op not in DECODE_OPS:
            cfg.pop("mma_instr", None)  # a new tile was built and checked with the arch's own instruction
        cfg.pop("max_stack_bytes", None)
        cfg.update(_tile_entry(row))

    _update_tiles(winners, op, update)


def full_band_choice(winner: dict, own: dict | None) -> dict | None:
    """The full-band tile to store: the winner where it beats the entry's own tile by FULL_BAND_MIN_GAIN, else None
    (the entry's own tile serves full-band calls too). Without a timing of the own tile (it failed), the winner."""
    if own is not None and winner["geomean"] < own["geomean"] * FULL_BAND_MIN_GAIN:
        return None  # also when the own tile itself won
    return _tile_entry(winner)


def write_full_band_tiles(winners: dict, own: dict, op: str) -> None:
    def update(cfg, row):
        choice, old = full_band_choice(row, own.get((row["arch"], row["bucket"]))), cfg.get(variants.FULL_BAND)
        if choice is None:
            cfg.pop(variants.FULL_BAND, None)
        elif old is None or _tile(old) != _tile(choice):  # one that won again keeps its entry as it is
            cfg[variants.FULL_BAND] = choice

    _update_tiles(winners, op, update)


if __name__ == "__main__":
    sys.exit(main())
