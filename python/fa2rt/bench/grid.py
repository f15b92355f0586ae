"""--grid: the FA2 paper's grid, fa2rt against SDPA's flash, cuDNN and efficient backends.

16k tokens per batch (batch = 16384 // seqlen), hidden size 2048 (nheads = 2048 // headdim), seqlen 512..16k, head
dims 64/128/256, bf16 and fp16, causal and not. Per pass (--passes) writes <pass>-<tag>.json (environment, settings,
rows, summary; <pass> is fwd, bwd or fwd_bwd) and <pass>-<tag>.png (when matplotlib is present), prints a TFLOP/s
table and, at the very end, the fa2rt / SDPA summary per (dtype, head dim, causal) of every pass."""

import json
from pathlib import Path

import torch

from . import common
from .common import CONTENDERS, PASSES, fwd_flops, image_arch, kernel_errors, ms_of, num, result

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128, 256)


def bench_shape(dtype, head_dim, causal, seqlen, batch, nheads, *, passes=("fwd",), warmup=25, rep=100) -> dict:
    """One row: every contender of every pass timed on one problem shape (seqlen_q == seqlen_k)."""
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device=common.DEVICE, dtype=dt) for _ in range(3))
    decision = common.explain_safely(q, k, v, causal=causal)
    row = {"dtype": dtype, "head_dim": head_dim, "causal": causal, "seqlen": seqlen, "batch": batch,
           "nheads": nheads, "fa2rt_image": decision.get("image"), "fa2rt_explain": decision}
    for pass_name in passes:
        p = PASSES[pass_name]
        inputs = p.inputs(q, k, v)
        if p.explain_key not in row:
            row[p.explain_key] = common.explain_safely(*inputs, causal=causal)
        decision = row[p.explain_key]
        flops = p.flop_factor * fwd_flops(batch, nheads, seqlen, head_dim, causal)
        prepares = p.runs(inputs, causal)
        if decision["path"] != "kernel":
            common.store(row, "fa2rt", pass_name, common.not_timed(decision))
            del prepares["fa2rt"]
        for name, res in common.measure_together(prepares, flops, warmup, rep).items():
            common.store(row, name, pass_name, res)
        del inputs
    del q, k, v
    return row


def bench(dtypes, head_dims, seqlens, causals, *, passes=("fwd",), warmup=25, rep=100, progress=None) -> list[dict]:
    """The FA2 grid: TOKENS tokens per batch, hidden HIDDEN."""
    rows = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for causal in causals:
                for seqlen in seqlens:
                    batch, nheads = max(1, common.TOKENS // seqlen), common.HIDDEN // head_dim
                    rows.append(bench_shape(dtype, head_dim, causal, seqlen, batch, nheads, passes=passes,
                                            warmup=warmup, rep=rep))
                    if progress:
                        progress(rows[-1])
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Summaries and tables


def _stats(rows, other, pass_name):
    pairs = [(common.ratio(r, other, pass_name), r["seqlen"]) for r in rows]
    pairs = [(x, s) for x, s in pairs if x is not None]
    if not pairs:
        return {"geomean": None, "min": None, "min_seqlen": None, "n": 0}
    low, at = min(pairs)
    return {"geomean": common.geomean([x for x, _ in pairs]), "min": low, "min_seqlen": at, "n": len(pairs)}


def summarize(rows, pass_name="fwd") -> dict:
    """Per (dtype, head_dim, causal) and overall: geometric mean and min of fa2rt / sdpa_flash, and the geometric
    means of fa2rt / sdpa_cudnn and fa2rt / best SDPA backend, over the rows where both sides were timed."""
    def block(sel):
        return {"rows": len(sel), "fa2rt_timed": sum(1 for r in sel if ms_of(r, "fa2rt", pass_name)),
                **{f"fa2rt_over_{o}": _stats(sel, o, pass_name) for o in ("sdpa_flash", "sdpa_cudnn", "best_sdpa")}}
    groups = []
    for key in dict.fromkeys((r["dtype"], r["head_dim"], r["causal"]) for r in rows):
        sel = [r for r in rows if (r["dtype"], r["head_dim"], r["causal"]) == key]
        groups.append({"dtype": key[0], "head_dim": key[1], "causal": key[2], **block(sel)})
    images = sorted({label for r in rows for label in _image_labels(r, pass_name) if label})
    return {"pass": pass_name, "images": images, "groups": groups, "overall": block(rows)}


def _image_labels(row, pass_name="fwd") -> list:
    """["sm90 native"] for a row whose fa2rt call ran a kernel (with a backward pass, also its backward images');
    older files (no fa2rt_explain) give the arch only."""
    e = row.get(PASSES[pass_name].explain_key)
    if e is None:
        return [image_arch(row.get("fa2rt_image"))] if pass_name == "fwd" else []
    if e.get("path") != "kernel":
        return []
    return [f"{x.get('arch')} {x.get('mode')}" for x in (e, *e.get("backward", ()))]


def _cell(res: dict, width=15) -> str:
    if "tflops" in res:
        return f"{res['tflops']:{width}.1f}"
    return f"{'fallback' if res.get('fallback') else 'err':>{width}}"


def table(rows, pass_name="fwd") -> str:
    """TFLOP/s per row and contender ("err": the backend refused or failed, "fallback": fa2rt not timed)."""
    lines = [f"{'dtype':9}{'d':>4}{'causal':>7}{'seqlen':>7} " + "".join(f"{n:>15}" for n in CONTENDERS)
             + f"{'vs flash':>9}"]
    for r in rows:
        cells = "".join(_cell(result(r, n, pass_name)) for n in CONTENDERS)
        lines.append(f"{r['dtype']:9}{r['head_dim']:>4}{r['causal']!s:>7}{r['seqlen']:>7} {cells}"
                     f"{num(common.ratio(r, 'sdpa_flash', pass_name), 9)}")
    overall = _stats(rows, "sdpa_flash", pass_name)
    lines.append(f"geometric mean fa2rt / sdpa_flash: {num(overall['geomean'], 0)}x, "
                 f"min {num(overall['min'], 0)}x over {overall['n']} rows")
    lines += error_lines(rows, CONTENDERS, pass_name)
    return "\n".join(lines)


def error_lines(rows, contenders, pass_name="fwd", limit=12) -> list[str]:
    """One line per (contender, error) with the shapes it hit, so a backend refusing a whole group takes one line."""
    errors = {}
    for r in rows:
        for n in contenders:
            if "error" in result(r, n, pass_name):
                errors.setdefault((n, result(r, n, pass_name)["error"]), []).append(
                    f"{r['dtype']} d{r['head_dim']} causal={r['causal']} seqlen={r['seqlen']}")
    lines = []
    for (n, err), shapes in list(errors.items())[:limit]:
        more = f" (+{len(shapes) - 1} more rows)" if len(shapes) > 1 else ""
        lines.append(f"  {n} {shapes[0]}{more}: {err}")
    if len(errors) > limit:
        lines.append(f"  (+{len(errors) - limit} more errors, in the JSON)")
    return lines


def summary_table(summary: dict) -> str:
    """The short human-readable table: fa2rt / SDPA per (dtype, head dim, causal) and overall (> 1: fa2rt faster)."""
    head = (f"{'dtype':9}{'d':>4}{'causal':>7}{'n':>4}{'flash':>8}{'min':>7}{'at seqlen':>10}{'cudnn':>8}"
            f"{'best':>7}{'min':>7}")
    lines = [f"fa2rt / SDPA, {summary['pass']}: speed ratio over the SDPA flash, cuDNN and best SDPA backend "
             "(geometric mean over seqlen, and min; > 1: fa2rt faster)",
             f"images: {', '.join(summary['images']) or 'none ran'}", head]

    def line(label, b):
        f, c, best = b["fa2rt_over_sdpa_flash"], b["fa2rt_over_sdpa_cudnn"], b["fa2rt_over_best_sdpa"]
        at = f"{f['min_seqlen']:>10}" if f["min_seqlen"] is not None else f"{'-':>10}"
        return (f"{label}{f['n']:>4}{num(f['geomean'], 8)}{num(f['min'], 7)}{at}{num(c['geomean'], 8)}"
                f"{num(best['geomean'], 7)}{num(best['min'], 7)}")
    for g in summary["groups"]:
        lines.append(line(f"{g['dtype']:9}{g['head_dim']:>4}{g['causal']!s:>7}", g))
    lines.append(line(f"{'all':20}", summary["overall"]))
    untimed = summary["overall"]["rows"] - summary["overall"]["fa2rt_timed"]
    if untimed:
        lines.append(f"fa2rt not timed on {untimed} of {summary['overall']['rows']} rows (fallback or error: see "
                     f"the table above)")
    return "\n".join(lines)


def plot(rows, path: Path, pass_name="fwd") -> bool:
    """TFLOP/s of one pass against seqlen: one panel per (dtype, causal) row and head dim column. False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    row_keys = list(dict.fromkeys((r["dtype"], r["causal"]) for r in rows))
    dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(len(row_keys), len(dims), figsize=(4 * len(dims), 3.2 * len(row_keys)), squeeze=False)
    for i, (dtype, causal) in enumerate(row_keys):
        for j, d in enumerate(dims):
            ax = axes[i][j]
            sel = [r for r in rows if (r["dtype"], r["causal"], r["head_dim"]) == (dtype, causal, d)]
            if not sel:
                ax.axis("off")
                continue
            for name in CONTENDERS:
                tflops = [result(r, name, pass_name).get("tflops", float("nan")) for r in sel]
                ax.plot([r["seqlen"] for r in sel], tflops, marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{pass_name} {dtype} d{d} {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------
# The mode


def run(args, env, tag, settings, progress=None):
    """Times the grid; per pass writes <stem>-<tag>.json (every row holds all passes; the summary is this pass's)
    and .png and prints its table. Returns ([summary per pass], status)."""
    rows = bench(args.dtype, args.head_dim, args.seqlen, args.causal, passes=args.passes, warmup=args.warmup_ms,
                 rep=args.rep_ms, progress=progress)
    summaries = []
    for p in map(PASSES.get, args.passes):
        summary = summarize(rows, p.name)
        summaries.append(summary)
        (args.out / f"{p.stem}-{tag}.json").write_text(json.dumps(
            {"environment": env, "settings": settings, "pass": p.name, "flop_factor": p.flop_factor, "rows": rows,
             "summary": summary}, indent=1))
        if not plot(rows, args.out / f"{p.stem}-{tag}.png", p.name):
            print("(matplotlib is not installed: no PNG)")
        print(f"{p.name}: TFLOP/s ({p.flop_factor:g}x the forward's FLOPs)\n{table(rows, p.name)}", flush=True)
    return summaries, 1 if kernel_errors(rows, args.passes) else 0
