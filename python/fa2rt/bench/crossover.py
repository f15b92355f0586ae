"""--crossover: short sequences (batch 1 and 8, 16 heads, d64/d128, bf16/fp16, causal and not, seqlen 16..1024): per
seqlen the geometric mean over those configurations of best_sdpa_ms / fa2rt_ms, and from it the short-sequence
threshold of the arch of the images that ran (sm90 natively, FA2RT_FORCE_ARCH's arch through PTX; see
crossover_threshold). These are device times: the L2 flush before each call (common.time_ms) hides host overhead up to
the flush's duration, and the policy's own host cost is paid on both paths. Forward only. Writes crossover-<tag>.json;
--write-crossover PATH merges the threshold into a crossover.json such as python/fa2rt/data/crossover.json (the
fallback policy's data)."""

import json
import math
import sys
from pathlib import Path

from . import common, grid
from .common import kernel_errors, num

CROSSOVER_SEQLENS = (16, 32, 64, 128, 256, 512, 1024)
# Batch 8 is a typical small training/serving batch; batch 1 (16 heads: 16 * ceil(seqlen / block_m) programs, under
# one wave on any of these GPUs) is where fixed per-call costs (launch, prologue, a tile mostly padding) weigh most,
# which is what the short-sequence fallback is for. Both enter the geometric mean, so the threshold suits neither
# extreme alone. Larger batches at these lengths behave like the FA2 grid's (the GPU is full) and are left out.
CROSSOVER_BATCHES = (1, 8)
CROSSOVER_REP_MS = 25  # its calls take microseconds: 25 ms of repetitions is still hundreds of samples
CROSSOVER_HEAD_DIMS = (64, 128)
CROSSOVER_NHEADS = 16

CROSSOVER_SCHEMA = 1
CROSSOVER_COMMENT = ("Per arch, min_seqlen_k: calls with a shorter seqlen_k use SDPA, because the best SDPA backend "
                     "measured faster there (python -m fa2rt.bench --crossover --write-crossover); 0: measured, and "
                     "no short-sequence fallback. An arch with no entry has not been measured and always uses the "
                     "kernel. FA2RT_MIN_SEQLEN overrides it.")
CROSSOVER_RULE = ("ratio(s) = geometric mean over configurations of best_sdpa_ms / fa2rt_ms at seqlen s; "
                  "min_seqlen_k = the first measured s, counting up from the shortest, with ratio(s) >= 1; 0 when "
                  "that is the shortest measured s; the largest measured s + 1 when there is none. slower_from = "
                  "the smallest measured s with ratio < 1 at it and every longer measured seqlen")


def crossover_bench(dtypes, head_dims, causals, batches, seqlens, *, warmup=25, rep=100, progress=None) -> list:
    rows = []
    for batch in batches:
        for dtype in dtypes:
            for head_dim in head_dims:
                for causal in causals:
                    for seqlen in seqlens:
                        row = grid.bench_shape(dtype, head_dim, causal, seqlen, batch, CROSSOVER_NHEADS,
                                               warmup=warmup, rep=rep)
                        name, _ = common.best_sdpa(row)
                        row.update(best_sdpa=name, ratio=common.ratio(row, "best_sdpa"))
                        rows.append(row)
                        if progress:
                            progress(row)
    return rows


def ratio_by_seqlen(rows) -> dict[int, dict]:
    """Per seqlen: geometric mean over configurations (batch, dtype, head dim, causal) of best_sdpa_ms / fa2rt_ms,
    over the configurations where fa2rt ran its kernel and at least one SDPA backend ran."""
    out = {}
    for s in sorted({r["seqlen"] for r in rows}):
        values = [r["ratio"] for r in rows if r["seqlen"] == s and r.get("ratio") is not None]
        out[s] = {"geomean": common.geomean(values) if values else None, "n": len(values),
                  "min": min(values) if values else None, "max": max(values) if values else None}
    return out


def _measured_seqlens(ratios: dict) -> list[int]:
    return sorted(s for s, r in ratios.items() if r is not None and math.isfinite(r))


def crossover_threshold(ratios: dict) -> int | None:
    """The short-sequence threshold (min_seqlen_k: calls with seqlen_k below it use SDPA) from
    {seqlen: geometric mean of best_sdpa_ms / fa2rt_ms} (a value of None: nothing measured there; ignored).

    Rule: counting up from the shortest measured seqlen, short sequences fall back while the best SDPA backend is
    faster; min_seqlen_k is the first measured seqlen at which fa2rt is at least as fast (ratio >= 1). 0 (no
    fallback) when fa2rt is at least as fast at the shortest measured seqlen: nothing shorter was measured, and
    no fallback is taken without a measurement. Losses after that first win do not move the threshold: a backend that
    is faster at long sequences is not a short-sequence effect, and a threshold cannot route it without sending
    every shorter call to SDPA too (slower_from reports it). Slower at every measured seqlen -> largest measured
    seqlen + 1, and crossover_note asks for longer measurements. None when no seqlen has a ratio.
    """
    measured = _measured_seqlens(ratios)
    if not measured:
        return None
    first_win = next((s for s in measured if ratios[s] >= 1.0), None)
    if first_win is None:
        return measured[-1] + 1
    return 0 if first_win == measured[0] else first_win


def slower_from(ratios: dict) -> int | None:
    """The smallest measured seqlen from which on fa2rt is slower than the best SDPA backend at every measured
    seqlen; None when it is at least as fast at the largest."""
    measured = _measured_seqlens(ratios)
    start = None
    for s in reversed(measured):
        if ratios[s] >= 1.0:
            break
        start = s
    return start


def crossover_note(ratios: dict, threshold) -> str:
    measured = _measured_seqlens(ratios)
    if threshold is None:
        return "no seqlen had both fa2rt's kernel and an SDPA backend timed: no threshold"
    if threshold > measured[-1]:
        return (f"fa2rt was slower than the best SDPA backend at every measured seqlen: the threshold {threshold} "
                "only says every measured length falls back; measure longer sequences")
    if threshold == 0:
        note = (f"fa2rt was at least as fast as the best SDPA backend at the shortest measured seqlen "
                f"{measured[0]}: no short-sequence fallback")
    else:
        note = f"the best SDPA backend is faster below seqlen {threshold}, fa2rt from there on"
    longer = slower_from(ratios)
    if longer is not None:
        note += (f"; the best SDPA backend is faster from seqlen {longer} on: not a short-sequence effect, so "
                 "not routed by this threshold")
    return note


def crossover_arch(rows) -> tuple[str | None, str]:
    """The arch of the images fa2rt ran in the crossover (one arch expected), and how they ran."""
    archs = {r["fa2rt_explain"].get("arch") for r in rows if r["fa2rt_explain"]["path"] == "kernel"}
    modes = sorted({r["fa2rt_explain"].get("mode") for r in rows if r["fa2rt_explain"]["path"] == "kernel"})
    if len(archs) != 1:
        return None, f"expected the images of one arch, ran {sorted(map(str, archs)) or 'none'}"
    return archs.pop(), ", ".join(map(str, modes))


def crossover_table(ratios, threshold, arch) -> str:
    lines = [f"short sequences, {arch}: best SDPA / fa2rt time (geometric mean over configurations; >= 1: fa2rt at "
             "least as fast)", f"{'seqlen':>7}{'n':>4}{'geomean':>9}{'min':>7}{'max':>7}"]
    for s, r in ratios.items():
        lines.append(f"{s:>7}{r['n']:>4}{num(r['geomean'], 9)}{num(r['min'], 7)}{num(r['max'], 7)}")
    lines.append(f"min_seqlen_k for {arch}: {threshold} ({crossover_note(_geomeans(ratios), threshold)})")
    return "\n".join(lines)


def _geomeans(ratios: dict) -> dict:
    return {s: r["geomean"] for s, r in ratios.items()}


def merge_crossover(path: Path, arch: str, min_seqlen_k: int, measured: dict) -> dict:
    """Set archs[arch] = {"min_seqlen_k", "measured"} in the crossover file at path (created when missing), keeping
    its schema_version, _comment, other keys and other archs. Returns the data written."""
    path = Path(path)
    if path.exists():
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("archs", {}), dict):
            raise ValueError(f"{path}: expected an object with an 'archs' object")
        if data.get("schema_version", CROSSOVER_SCHEMA) != CROSSOVER_SCHEMA:
            raise ValueError(f"{path}: schema_version: expected {CROSSOVER_SCHEMA}, got {data['schema_version']}")
    else:
        data = {"schema_version": CROSSOVER_SCHEMA, "_comment": CROSSOVER_COMMENT, "archs": {}}
    data.setdefault("schema_version", CROSSOVER_SCHEMA)
    data.setdefault("archs", {})[arch] = {"min_seqlen_k": int(min_seqlen_k), "measured": measured}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return data


def run(args, env, settings, path, progress=None) -> int:
    """Measures, writes path (crossover-<tag>.json), prints the table, merges --write-crossover; 1 when an fa2rt
    kernel call raised or the threshold could not be written."""
    rows = crossover_bench(args.dtype, args.crossover_head_dim, args.causal, args.crossover_batch,
                           args.crossover_seqlen, warmup=args.warmup_ms, rep=args.crossover_rep_ms,
                           progress=progress)
    ratios = ratio_by_seqlen(rows)
    geomeans = _geomeans(ratios)
    threshold = crossover_threshold(geomeans)
    verdict = {"slower_from": slower_from(geomeans), "note": crossover_note(geomeans, threshold)}
    arch, mode = crossover_arch(rows)
    status = 1 if kernel_errors(rows) else 0
    cfg = {"batches": args.crossover_batch, "nheads": CROSSOVER_NHEADS, "head_dims": args.crossover_head_dim,
           "dtypes": args.dtype, "causal": args.causal, "seqlens": args.crossover_seqlen}
    common.write_json(path, {
        "environment": env, "settings": {**settings, "rep_ms": args.crossover_rep_ms, **cfg},
        "rule": CROSSOVER_RULE, "arch": arch, "image_mode": mode, "min_seqlen_k": threshold, **verdict,
        "ratio_by_seqlen": {str(s): r for s, r in ratios.items()}, "rows": rows})
    print(crossover_table(ratios, threshold, arch or f"unknown arch ({mode})"), flush=True)
    if args.write_crossover:
        if arch is None or threshold is None:
            print(f"not writing {args.write_crossover}: " + (mode if arch is None else "no threshold"),
                  file=sys.stderr)
            return 1
        measured = {**{k: env[k] for k in ("device", "capability", "driver", "torch", "cuda", "triton", "date")},
                    "image_mode": mode, **cfg, "rule": CROSSOVER_RULE,
                    "ratio_by_seqlen": {str(s): r["geomean"] for s, r in ratios.items()}, **verdict}
        merge_crossover(args.write_crossover, arch, threshold, measured)
        print(f"wrote min_seqlen_k={threshold} for {arch} into {args.write_crossover}")
    return status
