"""python -m fa2rt.bench: fa2rt against PyTorch SDPA's backends, side by side in one process.

Modes (any combination runs in one process; with none named, --grid runs):

--grid       The FA2 paper's grid: 16k tokens per batch (batch = 16384 // seqlen), hidden size 2048
             (nheads = 2048 // headdim), seqlen 512..16k, head dims 64/128/256, bf16 and fp16, causal and not.
             Per pass (--passes) writes <pass>-<tag>.json (environment, settings, rows, summary; <pass> is fwd, bwd
             or fwd_bwd) and <pass>-<tag>.png (when matplotlib is present), prints a TFLOP/s table and, at the very
             end, the fa2rt / SDPA summary per (dtype, head dim, causal) of every pass.
--memory     Peak GPU memory of one forward call and of one forward+backward call (each after a warm-up call) of
             fa2rt and of each SDPA backend at seqlen 8k..64k (batch 1, hidden 2048, d128, bf16, causal and not),
             minus the memory live before the call (the inputs, and dout for the backward): it must grow linearly
             with seqlen, never with seqlen_q * seqlen_k. Writes memory-<tag>.json (a "pass" per row).
--crossover  Short sequences (batch 1 and 8, 16 heads, d64/d128, bf16/fp16, causal and not, seqlen 16..1024): per
             seqlen the geometric mean over those configurations of best_sdpa_ms / fa2rt_ms, and from it the
             short-sequence threshold of the arch of the images that ran (sm90 natively, FA2RT_FORCE_ARCH's arch
             through PTX; see crossover_threshold). These are device times: do_bench's L2 flush before each call
             hides host overhead up to the flush's duration, and the policy's own host cost is paid on both
             paths. Forward only. Writes crossover-<tag>.json; --write-crossover PATH merges the threshold into a
             crossover.json such as python/fa2rt/data/crossover.json (the fallback policy's data).

Passes of the grid (--passes, comma- or space-separated; default fwd):
  fwd        the forward call; FLOPs = 4*B*H*Nq*Nk*D (two matmuls), halved for causal.
  bwd        the backward only: the inputs require grad, the forward runs once untimed, then
             torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) is timed; FLOPs = 2.5x the forward's.
  fwd+bwd    forward and backward together, torch.autograd.grad(forward(), (q, k, v), dout); 3.5x the forward's.
Every SDPA backend runs its forward inside sdpa_kernel(<that backend>), so the backward timed is that backend's.
A backend that raises (refuses the shape, fails in its backward, runs out of memory) gets its error recorded in
place of a time. Example, a budget run: --passes fwd+bwd --dtype bfloat16 --head-dim 64 128.

<tag> is FA2RT_FORCE_ARCH's arch (e.g. sm80: its images through PTX) or "native". Times are medians of
triton.testing.do_bench (which flushes L2 before every call).
fa2rt is timed only where fa2rt.explain() says a kernel runs (recorded per row, with the fallback reason where not:
fa2rt_explain for the forward, fa2rt_explain_grad, with the backward images, for inputs requiring grad), and with
the short-sequence rule off (FA2RT_MIN_SEQLEN=0 while measuring): the benchmark measures the kernels.
Exit status: 0; 1 when an fa2rt kernel call raised or a requested crossover could not be determined or written;
2 for bad arguments or no GPU.
"""

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import api, config

TOKENS = 16384
HIDDEN = 2048
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128, 256)
DTYPES = ("bfloat16", "float16")
SDPA_NAMES = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
CONTENDERS = ("fa2rt", *SDPA_NAMES)

MEMORY_SEQLENS = (8192, 16384, 32768, 65536)
MEMORY_BATCH, MEMORY_HEAD_DIM, MEMORY_DTYPE = 1, 128, "bfloat16"

CROSSOVER_SEQLENS = (16, 32, 64, 128, 256, 512, 1024)
# Batch 8 is a typical small training/serving batch; batch 1 (16 heads: 16 * ceil(seqlen / block_m) programs, under
# one wave on any of these GPUs) is where fixed per-call costs (launch, prologue, a tile mostly padding) weigh most,
# which is what the short-sequence fallback is for. Both enter the geometric mean, so the threshold suits neither
# extreme alone. Larger batches at these lengths behave like the FA2 grid's (the GPU is full) and are left out.
CROSSOVER_BATCHES = (1, 8)
CROSSOVER_REP_MS = 25  # its calls take microseconds: 25 ms of repetitions is still hundreds of samples
CROSSOVER_HEAD_DIMS = (64, 128)
CROSSOVER_NHEADS = 16
DEVICE = "cuda"  # where the inputs live (the CPU tests point it at the CPU)

# --quick: a smoke run; each list replaces the default of the option it names unless that option is given.
QUICK = {"seqlen": [512, 1024], "head_dim": [64], "dtype": ["bfloat16"], "memory_seqlen": [8192, 16384],
         "crossover_seqlen": [64, 256, 1024], "crossover_batch": [8], "crossover_head_dim": [64]}
FULL = {"seqlen": list(SEQLENS), "head_dim": list(HEAD_DIMS), "dtype": list(DTYPES),
        "memory_seqlen": list(MEMORY_SEQLENS), "crossover_seqlen": list(CROSSOVER_SEQLENS),
        "crossover_batch": list(CROSSOVER_BATCHES), "crossover_head_dim": list(CROSSOVER_HEAD_DIMS)}

CROSSOVER_SCHEMA = 1
CROSSOVER_COMMENT = ("Per arch, min_seqlen_k: calls with a shorter seqlen_k use SDPA, because the best SDPA backend "
                     "measured faster there (python -m fa2rt.bench --crossover --write-crossover); 0: measured, and "
                     "no short-sequence fallback. An arch with no entry has not been measured and always uses the "
                     "kernel. FA2RT_MIN_SEQLEN overrides it.")
CROSSOVER_RULE = ("ratio(s) = geometric mean over configurations of best_sdpa_ms / fa2rt_ms at seqlen s; "
                  "min_seqlen_k = the first measured s, counting up from the shortest, with ratio(s) >= 1; 0 when "
                  "that is the shortest measured s; the largest measured s + 1 when there is none. slower_from = "
                  "the smallest measured s with ratio < 1 at it and every longer measured seqlen")


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and the timed passes


def fwd_flops(batch, nheads, seqlen, head_dim, causal, seqlen_k=None):
    """Forward FLOPs: 4*B*H*Nq*Nk*D (two matmuls), halved for causal (seqlen_k defaults to seqlen)."""
    seqlen_k = seqlen if seqlen_k is None else seqlen_k
    return 4 * batch * nheads * seqlen * seqlen_k * head_dim / (2 if causal else 1)


def sdpa_call(q, k, v, causal, backend_name):
    """SDPA restricted to one backend, on (batch, seqlen, nheads, headdim) inputs (transposed views, no copy)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[backend_name]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def run():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    return run


def fwd_runs(q, k, v, causal) -> dict[str, Callable]:
    """The forward call of every contender, each a no-argument callable."""
    runs = {"fa2rt": lambda: api.attention(q, k, v, causal=causal)}
    runs.update({name: sdpa_call(q, k, v, causal, name) for name in SDPA_NAMES})
    return runs


def _forward(forward, inputs):
    return forward


def _backward(forward, inputs):
    # The forward (an SDPA one inside its sdpa_kernel context, which fixes the backward its autograd node runs)
    # happens here, untimed; the graph is kept for every timed call.
    out = forward()
    dout = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)


def _forward_backward(forward, inputs):
    dout = torch.randn_like(forward())
    return lambda: torch.autograd.grad(forward(), inputs, dout)


@dataclass(frozen=True)
class Pass:
    """One timed pass: its results go under row[name] (the forward's at the row's top level, see result())."""
    name: str
    flop_factor: float  # FLOPs of the pass / forward FLOPs
    prepare: Callable  # (forward callable, inputs) -> the timed callable; what it does before returning is untimed
    grad: bool = False  # the inputs require grad; fa2rt's explain for them is row["fa2rt_explain_grad"]

    @property
    def stem(self) -> str:
        """The pass in file names: fwd, bwd, fwd_bwd."""
        return self.name.replace("+", "_")

    @property
    def explain_key(self) -> str:
        return "fa2rt_explain_grad" if self.grad else "fa2rt_explain"

    def inputs(self, q, k, v) -> tuple:
        """q, k, v as this pass takes them: leaves requiring grad (sharing the storage) for a backward pass."""
        return tuple(t.detach().requires_grad_() for t in (q, k, v)) if self.grad else (q, k, v)

    def runs(self, inputs, causal) -> dict[str, Callable]:
        """{contender: no-argument callable returning the timed callable}; errors in either count as the
        contender's (measure() and peak_memory() catch both)."""
        return {name: functools.partial(self.prepare, forward, inputs)
                for name, forward in fwd_runs(*inputs, causal).items()}


PASSES = {p.name: p for p in (Pass("fwd", 1.0, _forward), Pass("bwd", 2.5, _backward, grad=True),
                              Pass("fwd+bwd", 3.5, _forward_backward, grad=True))}
MEMORY_PASSES = ("fwd", "fwd+bwd")


def result(row: dict, contender: str, pass_name: str = "fwd") -> dict:
    """A contender's result in a row: {"ms", "tflops"} or {"error"}. The forward's sit at the row's top level
    (the format of the committed docs/bench files); another pass's under row[pass_name]."""
    holder = row if pass_name == "fwd" else row.get(pass_name, {})
    return holder.get(contender, {"error": "not measured"})


def _store(row: dict, contender: str, pass_name: str, value: dict) -> None:
    (row if pass_name == "fwd" else row.setdefault(pass_name, {}))[contender] = value


def ms_of(row, contender, pass_name="fwd"):
    return result(row, contender, pass_name).get("ms")


# ---------------------------------------------------------------------------------------------------------------
# Environment, timing, the kernel path


def environment() -> dict:
    import triton

    from . import __version__

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = None
    major, minor = torch.cuda.get_device_capability()
    capability = f"sm{major}{minor}"
    if getattr(torch.version, "hip", None):
        capability = torch.cuda.get_device_properties(0).gcnArchName.split(":")[0]
    return {"device": torch.cuda.get_device_name(), "capability": capability, "driver": driver,
            "torch": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
            "triton": triton.__version__, "fa2rt": __version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "force_arch": config.force_arch() or None}


def time_ms(fn, warmup=25, rep=100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


@contextlib.contextmanager
def kernel_forced():
    """The short-sequence rule off (FA2RT_MIN_SEQLEN=0, read by the policy at every call) for the measurements;
    the caller's value restored after."""
    saved = os.environ.get(config.MIN_SEQLEN)
    os.environ[config.MIN_SEQLEN] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(config.MIN_SEQLEN, None)
        else:
            os.environ[config.MIN_SEQLEN] = saved


def explain_record(decision) -> dict:
    """The JSON form of fa2rt.explain(...)'s decision; "backward": its backward images, for inputs requiring grad."""
    rec = {"path": decision.path}
    if decision.path == "kernel":
        rec.update(image=decision.image, mode=decision.mode, arch=image_arch(decision.image))
        if decision.backward:
            rec["backward"] = [{"image": image, "mode": mode, "arch": image_arch(image)}
                               for image, mode in decision.backward]
    else:
        rec.update(reason=decision.reason, message=decision.message)
    return rec


def image_arch(image: str | None) -> str | None:
    """The arch an image was built for: its manifest row, else its name (fwd-<arch>-...)."""
    if not image:
        return None
    try:
        from . import builds

        for row in builds.current_build().rows:
            if row.get("name") == image:
                return row.get("arch")
    except Exception:  # no build here: the name spells the arch out
        pass
    parts = image.split("-")
    return parts[1] if len(parts) > 1 else None


def _error_text(exc: BaseException, caught) -> str:
    text = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    notes = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    if notes:  # SDPA says why a backend refuses a shape in warnings, before a generic RuntimeError
        text += " [" + "; ".join(dict.fromkeys(notes)) + "]"
    return text[:400]


def _recover() -> None:
    with contextlib.suppress(Exception):
        torch.cuda.synchronize()
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()


def measure(prepare, flops, warmup, rep) -> dict:
    """{"ms", "tflops"} of the callable prepare() returns (prepare itself untimed), or {"error"} when either raises
    (a backend that refuses the shape or fails in its backward, an OOM)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ms = time_ms(prepare(), warmup=warmup, rep=rep)
        except Exception as exc:
            _recover()
            return {"error": _error_text(exc, caught)}
    return {"ms": ms, "tflops": flops / ms / 1e9}


def explain_safely(q, k, v, causal) -> dict:
    """explain_record of fa2rt.explain(...); {"path": "error"} when explain itself raises (then fa2rt is not timed
    and the run reports an error)."""
    try:
        return explain_record(api.explain(q, k, v, causal=causal))
    except Exception as exc:
        return {"path": "error", "message": _error_text(exc, [])}


def not_timed(decision_rec: dict) -> dict:
    """fa2rt's result where explain() says no kernel runs: the fallback is not what this benchmark measures."""
    if decision_rec.get("path") == "error":
        return {"error": f"not timed: fa2rt.explain() raised {decision_rec.get('message')}"[:400]}
    return {"error": f"not timed: fa2rt would fall back [{decision_rec.get('reason')}]: "
                     f"{decision_rec.get('message', '')}"[:400], "fallback": True}


def bench_shape(dtype, head_dim, causal, seqlen, batch, nheads, *, passes=("fwd",), warmup=25, rep=100) -> dict:
    """One row: every contender of every pass timed on one problem shape (seqlen_q == seqlen_k)."""
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device=DEVICE, dtype=dt) for _ in range(3))
    decision = explain_safely(q, k, v, causal)
    row = {"dtype": dtype, "head_dim": head_dim, "causal": causal, "seqlen": seqlen, "batch": batch,
           "nheads": nheads, "fa2rt_image": decision.get("image"), "fa2rt_explain": decision}
    for pass_name in passes:
        p = PASSES[pass_name]
        inputs = p.inputs(q, k, v)
        if p.explain_key not in row:
            row[p.explain_key] = explain_safely(*inputs, causal)
        decision = row[p.explain_key]
        flops = p.flop_factor * fwd_flops(batch, nheads, seqlen, head_dim, causal)
        for name, prepare in p.runs(inputs, causal).items():
            if name == "fa2rt" and decision["path"] != "kernel":
                _store(row, name, pass_name, not_timed(decision))
                continue
            _store(row, name, pass_name, measure(prepare, flops, warmup, rep))
        del inputs
    del q, k, v
    return row


def bench(dtypes, head_dims, seqlens, causals, *, passes=("fwd",), warmup=25, rep=100, progress=None) -> list[dict]:
    """The FA2 grid: 16k tokens per batch, hidden 2048."""
    rows = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for causal in causals:
                for seqlen in seqlens:
                    batch, nheads = max(1, TOKENS // seqlen), HIDDEN // head_dim
                    rows.append(bench_shape(dtype, head_dim, causal, seqlen, batch, nheads, passes=passes,
                                            warmup=warmup, rep=rep))
                    if progress:
                        progress(rows[-1])
    return rows


def kernel_errors(rows, passes=("fwd",)) -> list[str]:
    """fa2rt calls that were meant to run a kernel and raised instead (not the fallbacks explain() announced)."""
    return [f"{'' if p == 'fwd' else p + ' '}{r['dtype']} d{r['head_dim']} causal={r['causal']} "
            f"seqlen={r['seqlen']}: {res['error']}"
            for p in passes for r in rows for res in [result(r, "fa2rt", p)]
            if "error" in res and not res.get("fallback")]


# ---------------------------------------------------------------------------------------------------------------
# Summaries and tables


def geomean(values):
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def ratio(row, other, pass_name="fwd"):
    """fa2rt's speed over `other`'s (other_ms / fa2rt_ms; > 1: fa2rt faster); other may be "best_sdpa"."""
    mine = ms_of(row, "fa2rt", pass_name)
    theirs = best_sdpa(row, pass_name)[1] if other == "best_sdpa" else ms_of(row, other, pass_name)
    return theirs / mine if mine and theirs else None


def best_sdpa(row, pass_name="fwd"):
    """(name, ms) of the fastest SDPA backend that ran, or (None, None)."""
    timed = [(ms_of(row, n, pass_name), n) for n in SDPA_NAMES if ms_of(row, n, pass_name)]
    if not timed:
        return None, None
    ms, name = min(timed)
    return name, ms


def _stats(rows, other, pass_name):
    pairs = [(ratio(r, other, pass_name), r["seqlen"]) for r in rows]
    pairs = [(x, s) for x, s in pairs if x is not None]
    if not pairs:
        return {"geomean": None, "min": None, "min_seqlen": None, "n": 0}
    low, at = min(pairs)
    return {"geomean": geomean([x for x, _ in pairs]), "min": low, "min_seqlen": at, "n": len(pairs)}


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


def _num(x, width, fmt=".2f"):
    return f"{x:{width}{fmt}}" if x is not None and math.isfinite(x) else f"{'-':>{width}}"


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
                     f"{_num(ratio(r, 'sdpa_flash', pass_name), 9)}")
    overall = _stats(rows, "sdpa_flash", pass_name)
    lines.append(f"geometric mean fa2rt / sdpa_flash: {_num(overall['geomean'], 0)}x, "
                 f"min {_num(overall['min'], 0)}x over {overall['n']} rows")
    errors = {}  # (contender, error) -> shapes, so a backend refusing a whole group takes one line
    for r in rows:
        for n in CONTENDERS:
            if "error" in result(r, n, pass_name):
                errors.setdefault((n, result(r, n, pass_name)["error"]), []).append(
                    f"{r['dtype']} d{r['head_dim']} causal={r['causal']} seqlen={r['seqlen']}")
    for (n, err), shapes in list(errors.items())[:12]:
        more = f" (+{len(shapes) - 1} more rows)" if len(shapes) > 1 else ""
        lines.append(f"  {n} {shapes[0]}{more}: {err}")
    if len(errors) > 12:
        lines.append(f"  (+{len(errors) - 12} more errors, in the JSON)")
    return "\n".join(lines)


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
        return (f"{label}{f['n']:>4}{_num(f['geomean'], 8)}{_num(f['min'], 7)}{at}{_num(c['geomean'], 8)}"
                f"{_num(best['geomean'], 7)}{_num(best['min'], 7)}")
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
# --memory


def peak_memory(prepare) -> dict:
    """Bytes of one call of the callable prepare() returns beyond what was live before it (after a warm-up call, so
    one-time workspaces and handles are already there): max_memory_allocated() after reset_peak_memory_stats(),
    minus memory_allocated() before the call (the inputs, plus anything else still live such as a backward's dout,
    reported as baseline_bytes)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn = prepare()
            out = fn()
            del out
            torch.cuda.synchronize()
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            del out
        except Exception as exc:
            _recover()
            return {"error": _error_text(exc, caught)}
    return {"peak_bytes": peak, "baseline_bytes": baseline, "extra_bytes": peak - baseline}


def memory_bench(seqlens, causals) -> list[dict]:
    rows = []
    nheads, dt = HIDDEN // MEMORY_HEAD_DIM, getattr(torch, MEMORY_DTYPE)
    for causal in causals:
        for seqlen in seqlens:
            _recover()
            q, k, v = (torch.randn(MEMORY_BATCH, seqlen, nheads, MEMORY_HEAD_DIM, device=DEVICE, dtype=dt)
                       for _ in range(3))
            inputs_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
            for pass_name in MEMORY_PASSES:
                p = PASSES[pass_name]
                inputs = p.inputs(q, k, v)
                decision = explain_safely(*inputs, causal)
                for name, prepare in p.runs(inputs, causal).items():
                    row = {"impl": name, "pass": pass_name, "dtype": MEMORY_DTYPE, "head_dim": MEMORY_HEAD_DIM,
                           "causal": causal, "seqlen": seqlen, "batch": MEMORY_BATCH, "nheads": nheads,
                           "inputs_bytes": inputs_bytes, "out_bytes": q.numel() * q.element_size()}
                    if name == "fa2rt":
                        row["fa2rt_explain"] = decision
                    row.update(not_timed(decision) if name == "fa2rt" and decision["path"] != "kernel"
                               else peak_memory(prepare))
                    rows.append(row)
                del inputs
            del q, k, v
    return rows


def memory_table(rows) -> str:
    """Extra MiB per call; extra/out stays flat when memory grows linearly with seqlen."""
    mib = 2.0 ** 20
    lines = [f"peak memory of one call (forward, or forward+backward) beyond its inputs ({MEMORY_DTYPE}, "
             f"d{MEMORY_HEAD_DIM}, batch {MEMORY_BATCH}, hidden {HIDDEN}); an allocation growing with "
             "seqlen_q * seqlen_k would show as extra/out doubling per seqlen doubling",
             f"{'impl':15}{'pass':>8}{'causal':>7}{'seqlen':>8}{'extra MiB':>11}{'out MiB':>9}{'extra/out':>10}"]
    for r in sorted(rows, key=lambda r: (r.get("pass", "fwd"), r["impl"], r["causal"], r["seqlen"])):
        head = f"{r['impl']:15}{r.get('pass', 'fwd'):>8}{r['causal']!s:>7}{r['seqlen']:>8}"
        if "extra_bytes" in r:
            lines.append(f"{head}{r['extra_bytes'] / mib:11.1f}{r['out_bytes'] / mib:9.1f}"
                         f"{r['extra_bytes'] / r['out_bytes']:10.2f}")
        else:
            lines.append(f"{head}  {r['error'][:90]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# --crossover


def crossover_bench(dtypes, head_dims, causals, batches, seqlens, *, warmup=25, rep=100, progress=None) -> list:
    rows = []
    for batch in batches:
        for dtype in dtypes:
            for head_dim in head_dims:
                for causal in causals:
                    for seqlen in seqlens:
                        row = bench_shape(dtype, head_dim, causal, seqlen, batch, CROSSOVER_NHEADS, warmup=warmup,
                                          rep=rep)
                        name, _ = best_sdpa(row)
                        row.update(best_sdpa=name, ratio=ratio(row, "best_sdpa"))
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
        out[s] = {"geomean": geomean(values) if values else None, "n": len(values),
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
        lines.append(f"{s:>7}{r['n']:>4}{_num(r['geomean'], 9)}{_num(r['min'], 7)}{_num(r['max'], 7)}")
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


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fa2rt.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_argument_group("modes (with none named, --grid runs)")
    modes.add_argument("--grid", action="store_true", help="the FA2 paper grid (<pass>-<tag>.json, .png per pass)")
    modes.add_argument("--memory", action="store_true", help="peak memory at long seqlen (memory-<tag>.json)")
    modes.add_argument("--crossover", action="store_true", help="short-sequence crossover (crossover-<tag>.json)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: each list option not given takes a tiny value (" +
                   ", ".join(f"{k.replace('_', '-')} {' '.join(map(str, v))}" for k, v in QUICK.items()) + ")")
    p.add_argument("--passes", nargs="+", default=["fwd"], metavar="PASS",
                   help=f"grid: the passes to time, comma- or space-separated, of {', '.join(PASSES)} (default fwd; "
                   "e.g. --passes fwd,bwd,fwd+bwd)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="grid and crossover (default: both)")
    p.add_argument("--causal", nargs="+", default=["false", "true"], choices=["false", "true"],
                   help="grid, memory and crossover (default: both)")
    p.add_argument("--head-dim", nargs="+", type=int, help="grid (default 64 128 256)")
    p.add_argument("--seqlen", nargs="+", type=int, help="grid (default 512 .. 16384)")
    p.add_argument("--memory-seqlen", nargs="+", type=int, help="memory (default 8192 16384 32768 65536)")
    p.add_argument("--crossover-seqlen", nargs="+", type=int, help="crossover (default 16 32 .. 1024)")
    p.add_argument("--crossover-batch", nargs="+", type=int, help="crossover (default 1 8)")
    p.add_argument("--crossover-head-dim", nargs="+", type=int, help="crossover (default 64 128)")
    p.add_argument("--write-crossover", type=Path, metavar="PATH",
                   help="merge the measured threshold into this crossover.json (needs --crossover, not --quick)")
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warmup per timing (default 25)")
    p.add_argument("--rep-ms", type=float, default=100,
                   help="do_bench repetition time per timing of the grid (default 100)")
    p.add_argument("--crossover-rep-ms", type=float, default=CROSSOVER_REP_MS,
                   help=f"the same for the crossover (default {CROSSOVER_REP_MS})")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for JSON and PNG")
    return p


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    """Parsed options with the list defaults resolved (--quick ones where --quick) and checked."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    for key in FULL:
        if getattr(args, key) is None:
            setattr(args, key, list((QUICK if args.quick else FULL)[key]))
    if not (args.grid or args.memory or args.crossover):
        args.grid = True
    args.causal = [c == "true" for c in dict.fromkeys(args.causal)]
    named = [name for item in args.passes for name in item.split(",") if name]
    unknown = [name for name in named if name not in PASSES]
    if unknown or not named:
        parser.error(f"--passes: expected names of {', '.join(PASSES)}, got {','.join(args.passes)!r}")
    args.passes = [name for name in PASSES if name in named]
    for key in FULL:
        if key != "dtype" and any(v <= 0 for v in getattr(args, key)):
            parser.error(f"--{key.replace('_', '-')}: expected positive integers, got {getattr(args, key)}")
    if any(d > HIDDEN for d in args.head_dim):
        parser.error(f"--head-dim: expected at most the hidden size {HIDDEN}, got {args.head_dim}")
    if args.write_crossover and not args.crossover:
        parser.error("--write-crossover needs --crossover")
    if args.write_crossover and args.quick:
        parser.error("--write-crossover takes a full crossover measurement; drop --quick")
    if min(args.warmup_ms, args.rep_ms, args.crossover_rep_ms) <= 0:
        parser.error("--warmup-ms, --rep-ms, --crossover-rep-ms: expected positive numbers")
    return args


def plan(args) -> dict:
    """Measured configurations per mode (each measures the 4 contenders; the grid counts a configuration once per
    pass), for the time budget."""
    n = {}
    if args.grid:
        n["grid"] = len(args.dtype) * len(args.head_dim) * len(args.causal) * len(args.seqlen) * len(args.passes)
    if args.memory:
        n["memory"] = len(args.causal) * len(args.memory_seqlen) * len(MEMORY_PASSES)
    if args.crossover:
        n["crossover"] = (len(args.crossover_batch) * len(args.dtype) * len(args.crossover_head_dim)
                          * len(args.causal) * len(args.crossover_seqlen))
    return n


def _progress(label, passes=("fwd",)):
    def report(row):
        states = []
        for p in passes:
            res = result(row, "fa2rt", p)
            states.append(f"{p} " + (f"{res['tflops']:.1f} TFLOP/s" if "tflops" in res else res["error"][:80]))
        print(f"  {label} {row['dtype']} d{row['head_dim']} causal={row['causal']} b{row['batch']} "
              f"s{row['seqlen']}: fa2rt {', '.join(states)}", file=sys.stderr, flush=True)
    return report


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    if not torch.cuda.is_available():
        parser.error(f"the benchmark needs a GPU: torch {torch.__version__} sees none "
                     "(torch.cuda.is_available() is False)")
    env = environment()
    tag = config.force_arch() or "native"
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "quick": args.quick, "passes": args.passes}
    print(json.dumps(env))
    print(f"timed configurations (x{len(CONTENDERS)} contenders): {json.dumps(plan(args))}", flush=True)
    status, summaries = 0, None
    with kernel_forced():
        if args.grid:
            summaries, code = _guarded("grid", run_grid, args, env, tag, settings)
            status = max(status, code)
        if args.memory:
            status = max(status, _guarded("memory", run_memory, args, env, tag)[1])
        if args.crossover:
            status = max(status, _guarded("crossover", run_crossover, args, env, tag, settings)[1])
    if summaries is not None:
        print("\n\n".join(map(summary_table, summaries)))
    return status


def _guarded(mode, fn, *args):
    """(value, status) of one mode; a mode that crashes is reported (traceback, status 1) and the others still
    run, since a device run is one shot."""
    try:
        value = fn(*args)
    except Exception:
        traceback.print_exc()
        print(f"the {mode} mode failed (traceback above)", file=sys.stderr, flush=True)
        return None, 1
    return value if isinstance(value, tuple) else (None, value)


def run_grid(args, env, tag, settings):
    """Times the grid; per pass writes <stem>-<tag>.json (every row holds all passes; the summary is this pass's)
    and .png and prints its table. Returns ([summary per pass], status)."""
    rows = bench(args.dtype, args.head_dim, args.seqlen, args.causal, passes=args.passes, warmup=args.warmup_ms,
                 rep=args.rep_ms, progress=_progress("grid", args.passes))
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


def run_memory(args, env, tag) -> int:
    mem = memory_bench(args.memory_seqlen, args.causal)
    (args.out / f"memory-{tag}.json").write_text(json.dumps(
        {"environment": env, "settings": {"batch": MEMORY_BATCH, "hidden": HIDDEN, "dtype": MEMORY_DTYPE,
                                          "head_dim": MEMORY_HEAD_DIM, "passes": list(MEMORY_PASSES)},
         "rows": mem}, indent=1))
    print(memory_table(mem), flush=True)
    return 1 if any(r["impl"] == "fa2rt" and "error" in r and not r.get("fallback") for r in mem) else 0


def run_crossover(args, env, tag, settings) -> int:
    rows = crossover_bench(args.dtype, args.crossover_head_dim, args.causal, args.crossover_batch,
                           args.crossover_seqlen, warmup=args.warmup_ms, rep=args.crossover_rep_ms,
                           progress=_progress("crossover"))
    ratios = ratio_by_seqlen(rows)
    geomeans = _geomeans(ratios)
    threshold = crossover_threshold(geomeans)
    verdict = {"slower_from": slower_from(geomeans), "note": crossover_note(geomeans, threshold)}
    arch, mode = crossover_arch(rows)
    status = 1 if kernel_errors(rows) else 0
    cfg = {"batches": args.crossover_batch, "nheads": CROSSOVER_NHEADS, "head_dims": args.crossover_head_dim,
           "dtypes": args.dtype, "causal": args.causal, "seqlens": args.crossover_seqlen}
    (args.out / f"crossover-{tag}.json").write_text(json.dumps(
        {"environment": env, "settings": {**settings, "rep_ms": args.crossover_rep_ms, **cfg},
         "rule": CROSSOVER_RULE, "arch": arch, "image_mode": mode, "min_seqlen_k": threshold,
         **verdict, "ratio_by_seqlen": {str(s): r for s, r in ratios.items()}, "rows": rows}, indent=1))
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


if __name__ == "__main__":
    raise SystemExit(main())
