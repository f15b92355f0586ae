"""What every mode of the benchmark shares: the problem sizes, FLOPs, the timed passes, the environment record, timing
and peak-memory measurement, fa2rt.explain() records, ratios and geometric means, table cells and JSON output.

Modes read the patchable settings (DEVICE, TOKENS, HIDDEN, SDPA_NAMES, time_interleaved, sdpa_call) through this
module at call time (common.DEVICE, not a copy), so the CPU tests can point them at tiny CPU stand-ins in one place."""

import contextlib
import datetime
import functools
import json
import math
import platform
import statistics
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import api, config, routing

TOKENS = 16384  # tokens per batch of the FA2 grid (batch = TOKENS // seqlen), and of the varlen batches
HIDDEN = 2048  # nheads = HIDDEN // head_dim
DTYPES = ("bfloat16", "float16")
SDPA_NAMES = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
CONTENDERS = ("fa2rt", *SDPA_NAMES)
DEVICE = "cuda"  # where the inputs live (the CPU tests point it at the CPU)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and the timed passes


def fwd_flops(batch, nheads, seqlen, head_dim, causal, seqlen_k=None):
    """Forward FLOPs: 4*B*H*Nq*Nk*D (two matmuls), halved for causal (seqlen_k defaults to seqlen)."""
    seqlen_k = seqlen if seqlen_k is None else seqlen_k
    return 4 * batch * nheads * seqlen * seqlen_k * head_dim / (2 if causal else 1)


def sdpa_backend(name):
    """The SDPBackend of a contender name: a routing provider (sdpa_flash, sdpa_cudnn, sdpa_efficient) or
    sdpa_math."""
    from torch.nn.attention import SDPBackend

    if name == "sdpa_math":
        return SDPBackend.MATH
    if name not in routing.PROVIDERS:
        raise ValueError(f"backend name: expected one of {', '.join(routing.PROVIDERS)}, sdpa_math, got {name!r}")
    return routing.sdpa_backend(name)


def sdpa_call(q, k, v, causal, backend_name):
    """SDPA restricted to one backend, on (batch, seqlen, nheads, headdim) inputs (transposed views, no copy)."""
    from torch.nn.attention import sdpa_kernel

    backend = sdpa_backend(backend_name)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def run():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    return run


def fwd_runs(q, k, v, causal) -> dict[str, Callable]:
    """The forward call of every contender of the dense grid, each a no-argument callable."""
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

    def inputs(self, *tensors) -> tuple:
        """The tensors as this pass takes them: leaves requiring grad (sharing the storage) for a backward pass."""
        return tuple(t.detach().requires_grad_() for t in tensors) if self.grad else tensors

    def timed(self, forward, inputs) -> Callable:
        """A no-argument callable returning the timed callable of `forward` (a no-argument callable over inputs);
        errors in either count as the contender's (measure_together() and peak_memory() catch both)."""
        return functools.partial(self.prepare, forward, inputs)

    def runs(self, inputs, causal) -> dict[str, Callable]:
        """{contender: timed(...)} of every contender of the dense grid."""
        return {name: self.timed(forward, inputs) for name, forward in fwd_runs(*inputs, causal).items()}


PASSES = {p.name: p for p in (Pass("fwd", 1.0, _forward), Pass("bwd", 2.5, _backward, grad=True),
                              Pass("fwd+bwd", 3.5, _forward_backward, grad=True))}


def result(row: dict, contender: str, pass_name: str = "fwd") -> dict:
    """A contender's result in a row: {"ms", "tflops"} or {"error"}. The forward's sit at the row's top level
    (the format of the committed docs/bench files); another pass's under row[pass_name]."""
    holder = row if pass_name == "fwd" else row.get(pass_name, {})
    return holder.get(contender, {"error": "not measured"})


def store(row: dict, contender: str, pass_name: str, value: dict) -> None:
    (row if pass_name == "fwd" else row.setdefault(pass_name, {}))[contender] = value


def ms_of(row, contender, pass_name="fwd"):
    return result(row, contender, pass_name).get("ms")


# ---------------------------------------------------------------------------------------------------------------
# Environment, timing, the kernel path


def environment() -> dict:
    """The record every result file carries: device, driver, torch, Triton, CUDA/HIP, fa2rt, Python, date."""
    import triton

    from .. import __version__

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
            "cudnn": torch.backends.cudnn.version(),
            "triton": triton.__version__, "fa2rt": __version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "force_arch": config.force_arch() or None, "timing": TIMING}


# How time_ms times a call (the environment record names it). triton.testing.do_bench flushes the L2 by zeroing 256 MB
# before each call, which leaves the L2 full of dirty lines: their writeback then lands in the timed call. On the
# H200 that added 9-10 us to every contender of a decode step (49.9 against 41.1 us at batch 1, 32k; the same for
# cuDNN and for a plain read of the same bytes; docs/bench/flush-h200.json). Reading the same 256 MB instead leaves
# it cold and clean; that read also keeps the device busy while the host enqueues the timed call, as do_bench's
# write did, so these stay device times for calls whose host work takes less than the read (about 60 us).
TIMING = ("median of single calls between CUDA events, each after a 256 MB read (cold, clean L2); a point's contenders "
          "take turns call by call")
FLUSH_BYTES = 256 << 20
_FLUSH: dict = {}


def _flush_buffer(device: int) -> torch.Tensor:
    if device not in _FLUSH:
        _FLUSH[device] = torch.ones(FLUSH_BYTES // 8, dtype=torch.int64, device=f"cuda:{device}")
    return _FLUSH[device]


def time_interleaved(fns: dict[str, Callable], warmup=25, rep=100) -> dict[str, float]:
    """Median milliseconds of each fn() (name -> ms), the fns taking turns call by call: after about warmup ms of
    untimed calls each, rounds in which every fn runs once, each call timed alone between CUDA events after the L2
    flush TIMING describes, until the slowest fn has about rep ms of calls (as do_bench counts them). Each round
    starts one fn later, so no fn always follows the same one.
    Timing contenders one after another let the device's drift land on one of them: on the H200, the same cuDNN
    kernels timed as two contenders differed by 0.89-1.07x (docs/bench/routing-check-s44-h200.json), and one
    contender's rounds by up to 12%. Taking turns puts the drift on all of them alike."""
    flush = _flush_buffer(torch.cuda.current_device())
    total = torch.empty((), dtype=torch.int64, device=flush.device)

    def timed_once(fn):
        torch.sum(flush, dim=0, out=total)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end

    def medians(events: dict) -> dict:
        torch.cuda.synchronize()
        return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in events.items()}

    names = list(fns)
    per_call = medians({name: [timed_once(fns[name]) for _ in range(5)] for name in names})
    for name in names:
        for _ in range(max(1, int(warmup / max(per_call[name], 1e-3)))):
            fns[name]()
    events = {name: [] for name in names}
    for turn in range(max(5, int(rep / max(max(per_call.values()), 1e-3)))):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            events[name].append(timed_once(fns[name]))
    return medians(events)


def time_ms(fn, warmup=25, rep=100) -> float:
    """time_interleaved of fn alone."""
    return time_interleaved({"": fn}, warmup, rep)[""]


@contextlib.contextmanager
def kernel_forced():
    """fa2rt's own kernels for the measurements: the short-sequence rule (FA2RT_MIN_SEQLEN=0) and the routing table
    (FA2RT_ROUTING=0) off; the --routing mode turns routing on for its "as routed" contender."""
    with config.overridden(config.MIN_SEQLEN, "0"), config.overridden(config.ROUTING, "0"):
        yield


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
        if decision.path == "routed":
            rec["provider"] = decision.provider
    return rec


def image_arch(image: str | None) -> str | None:
    """The arch an image was built for: its manifest row, else its name (fwd-<arch>-...)."""
    if not image:
        return None
    try:
        from .. import builds

        for row in builds.current_build().rows:
            if row.get("name") == image:
                return row.get("arch")
    except Exception:  # no build here: the name spells the arch out
        pass
    parts = image.split("-")
    return parts[1] if len(parts) > 1 else None


def error_text(exc: BaseException, caught=()) -> str:
    """One line for an exception, with the warnings caught around it (SDPA says why a backend refuses a shape in
    warnings, before a generic RuntimeError)."""
    text = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    notes = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    if notes:
        text += " [" + "; ".join(dict.fromkeys(notes)) + "]"
    return text[:400]


def recover() -> None:
    """After a failed call (an OOM above all): wait for the device and give cached memory back."""
    with contextlib.suppress(Exception):
        torch.cuda.synchronize()
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()


def graphed(fn: Callable) -> Callable:
    """A callable replaying fn's work from a CUDA graph (fn captured once, after a warm-up call on a side stream as
    capture needs): the kernels' time without the host's, as a serving loop that replays graphs sees it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure_together(prepares: dict[str, Callable], work, warmup, rep, unit="tflops") -> dict[str, dict]:
    """Per contender (name -> prepare), {"ms", unit} of the callable prepare() returns (prepare itself untimed), or
    {"error"} when either raises (a backend that refuses the shape or fails in its backward, an OOM); unit's value is
    work / ms / 1e9: TFLOP/s for work in FLOPs, TB/s for work in bytes. The contenders are timed taking turns
    (time_interleaved), so that their ratios are not the device's drift. A contender whose prepare() or first call
    raises is left out of the timing; an error during the timing is every contender's."""
    results, fns = {}, {}
    for name, prepare in prepares.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn = prepare()
                fn()
                fns[name] = fn
            except Exception as exc:
                recover()
                results[name] = {"error": error_text(exc, caught)}
    if fns:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                times = time_interleaved(fns, warmup=warmup, rep=rep)
                results |= {name: {"ms": ms, unit: work / ms / 1e9} for name, ms in times.items()}
            except Exception as exc:
                recover()
                results |= {name: {"error": error_text(exc, caught)} for name in fns}
    return {name: results[name] for name in prepares}


def median_round(results: list[dict]) -> dict | None:
    """Rounds of one timing merged: the round with the median time, with every round's time under "rounds_ms" (their
    spread is the noise); None when a round has no time (an error)."""
    if not all("ms" in res for res in results):
        return None
    ordered = sorted(results, key=lambda res: res["ms"])
    return dict(ordered[len(ordered) // 2], rounds_ms=[res["ms"] for res in results])


def merged_rounds(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """measure_together's results of several rounds, per contender: median_round, or its first error."""
    return {name: median_round([r[name] for r in rounds]) or next(r[name] for r in rounds if "error" in r[name])
            for name in rounds[0]}


def paired_ratio(theirs: list[list[float]], mine: list[float]) -> float:
    """The median over rounds of (the fastest of theirs in a round) / mine in the same round. Rounds in which the
    contenders took turns (measure_together) are paired: each round's ratio is free of the drift between rounds."""
    return statistics.median(min(times) / own for *times, own in zip(*theirs, mine, strict=True))


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
            recover()
            return {"error": error_text(exc, caught)}
    return {"peak_bytes": peak, "baseline_bytes": baseline, "extra_bytes": peak - baseline}


def explain_safely(*args, **kwargs) -> dict:
    """explain_record of fa2rt.explain(*args, **kwargs) (dense or varlen arguments); {"path": "error"} when
    explain itself raises (then fa2rt is not timed and the run reports an error)."""
    try:
        return explain_record(api.explain(*args, **kwargs))
    except Exception as exc:
        return {"path": "error", "message": error_text(exc)}


def not_timed(decision_rec: dict) -> dict:
    """fa2rt's result where explain() says no kernel runs: the fallback is not what this benchmark measures."""
    if decision_rec.get("path") == "error":
        return {"error": f"not timed: fa2rt.explain() raised {decision_rec.get('message')}"[:400]}
    return {"error": f"not timed: fa2rt would fall back [{decision_rec.get('reason')}]: "
                     f"{decision_rec.get('message', '')}"[:400], "fallback": True}


def kernel_errors(rows, passes=("fwd",), contender="fa2rt") -> list[str]:
    """fa2rt calls that were meant to run a kernel and raised instead (not the fallbacks explain() announced)."""
    return [f"{'' if p == 'fwd' else p + ' '}{r['dtype']} d{r['head_dim']} causal={r['causal']} "
            f"seqlen={r['seqlen']}: {res['error']}"
            for p in passes for r in rows for res in [result(r, contender, p)]
            if "error" in res and not res.get("fallback")]


# ---------------------------------------------------------------------------------------------------------------
# Ratios, means, table cells, files


def geomean(values):
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def speedup(mine_ms, theirs_ms):
    """theirs_ms / mine_ms (> 1: mine faster); None unless both are positive times."""
    return theirs_ms / mine_ms if mine_ms and theirs_ms and mine_ms > 0 and theirs_ms > 0 else None


def ratio(row, other, pass_name="fwd"):
    """fa2rt's speed over `other`'s (other_ms / fa2rt_ms; > 1: fa2rt faster); other may be "best_sdpa"."""
    mine = ms_of(row, "fa2rt", pass_name)
    theirs = best_sdpa(row, pass_name)[1] if other == "best_sdpa" else ms_of(row, other, pass_name)
    return speedup(mine, theirs)


def best_of(row, names, pass_name="fwd"):
    """(name, ms) of the fastest of `names` that ran in the row, or (None, None)."""
    timed = [(ms_of(row, n, pass_name), n) for n in names if ms_of(row, n, pass_name)]
    if not timed:
        return None, None
    ms, name = min(timed)
    return name, ms


def best_sdpa(row, pass_name="fwd"):
    """(name, ms) of the fastest SDPA backend that ran, or (None, None)."""
    return best_of(row, SDPA_NAMES, pass_name)


def num(x, width, fmt=".2f"):
    """x formatted to width, or a right-aligned "-" for None/NaN."""
    return f"{x:{width}{fmt}}" if x is not None and math.isfinite(x) else f"{'-':>{width}}"


def write_json(path: Path, data: dict) -> Path:
    """data as indented JSON at path (its folder created); returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path
