"""Harness of the Gluon warp-specialised sm90 forward (backends/kernels/fwd_ws.py; issue 21 part 3; notes and results
in docs/bench/gluon-ws-notes.md): schedules other than the images' (tiles.json "ws") are compiled, checked and timed
here, launched through Triton's own launcher; fa2rt's images of the kernel are the "fa2rt" column of bench.

    python ci/gluon_ws.py compile VARIANT...          # any machine: compile for sm90, print registers/stack/smem
    python ci/gluon_ws.py check VARIANT               # H200: float64 reference on small shapes; exit 1 on a mismatch
    python ci/gluon_ws.py bench OUT.json VARIANT...   # H200: FA2 grid, same process: the variants, fa2rt's own
                                                      # kernels (routing off), SDPA cuDNN and flash
    python ci/gluon_ws.py ab OUT.json OLD.py VARIANT...  # H200: this fwd_ws.py against another copy of it (e.g.
                                                      # git show REV:backends/kernels/fwd_ws.py > OLD.py), same
                                                      # process: a quick check of this one, then timing rounds
                                                      # (calls taking turns) on the FA2 grid; new / old per point
    python ci/gluon_ws.py probe OUT.json VARIANT...   # H200: the s512 shapes where causal loses (issue 21): time
                                                      # per call against keys per tile, causal, masked, cold or warm
    python ci/gluon_ws.py compile-bwd|check-bwd VARIANT...  # the same for the dK/dV backward (bwd_ws.py)
    python ci/gluon_ws.py bench-bwd OUT.json VARIANT...

A VARIANT names the schedule in dash-separated parts: bnN (key block), sN (K/V ring stages), pp0/pp1 (consumers
take turns issuing their products), wN (consumer warpgroups of 64 query rows: 2, or 1 with two CTAs per SM), p1
(persistent: one CTA per SM walks the tiles), pr1 (that walk in pairs of row blocks m and last - m), mN (maxnreg),
rN (registers per consumer), lN (registers of the loader), qN (query buffers per consumer: 2 lets a persistent walk
load the next tile's queries early), pe0 (no copy of a tile's first block: it runs the loop's body with a zero
product; pe1, the default, peels it), d64/d128 (only that head dim). E.g. bn128-s2-pp1-d128. Backward variants take
bmN (query rows per block), sN, wN, mN, rN, lN, dN, dq1 (dQ too, added by TMA reduce) and x2 (each consumer adds
dQ for half the head dims over both consumers' keys): e.g. bm64-s2-dq1-x2-d128.
"""

import functools
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends/kernels"))
import aot  # noqa: E402
import bwd_ws  # noqa: E402
import fwd_ws  # noqa: E402

FLAGS = {"pp": "pingpong", "pr": "pairs", "dq": "dq", "pe": "peel"}
INTS = {"bn": "block_n", "s": "stages", "w": "num_wg", "m": "maxnreg", "r": "regs", "l": "loader_regs",
        "q": "q_bufs", "d": "only_d", "bm": "block_m", "x": "dq_split"}


def parse(variant: str) -> dict:
    """VARIANT -> fwd_ws.forward keyword arguments (plus only_d)."""
    kw = {}
    for part in variant.split("-"):
        key, value = re.fullmatch(r"([a-z]+)(\d+)", part).groups()
        if key in FLAGS:
            kw[FLAGS[key]] = value == "1"
        elif key == "p":
            kw["persistent"] = value == "1"
        elif key in INTS:
            kw[INTS[key]] = int(value)
        else:
            raise ValueError(f"variant part {part!r}: expected one of {sorted(FLAGS) + sorted(INTS) + ['p']}")
    return kw


def compile_variant(variant: str, head_dim: int):
    """Compiles the kernel for sm90 (no GPU needed); returns the CompiledKernel."""
    from triton.backends.compiler import GPUTarget

    kw = parse(variant)
    tile = {"block_n": kw.get("block_n", 128), "stages": kw.get("stages", 2), "pingpong": kw.get("pingpong", False),
            "num_wg": kw.get("num_wg", 2), "maxnreg": kw.get("maxnreg"), "consumer_regs": kw.get("regs"),
            "loader_regs": kw.get("loader_regs", fwd_ws.LOADER_REGS), "q_bufs": kw.get("q_bufs", 1),
            "pairs": kw.get("pairs", False), "peel": kw.get("peel", True)}
    return fwd_ws.compile_for(GPUTarget("cuda", 90, 32), "bf16", head_dim, tile)


def compile_bwd_variant(variant: str, head_dim: int):
    """The dK/dV backward compiled for sm90 (no GPU needed)."""
    from triton.backends.compiler import GPUTarget

    kw = parse(variant)
    tile = {"block_m": kw.get("block_m", 64), "stages": kw.get("stages", 2), "num_wg": kw.get("num_wg", 2),
            "maxnreg": kw.get("maxnreg"), "consumer_regs": kw.get("regs"),
            "loader_regs": kw.get("loader_regs", fwd_ws.LOADER_REGS), "dq": kw.get("dq", False),
            "dq_split": kw.get("dq_split", 1)}
    return bwd_ws.compile_for(GPUTarget("cuda", 90, 32), "bf16", head_dim, tile)


def resource_usage(compiled) -> dict:
    """Registers, stack and local bytes as aot.py reads them for its static checks, the shared memory, and the SASS
    instruction count (the code the SM's instruction cache has to hold)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()

        def dump(flag):
            return subprocess.run([str(aot._tool("cuobjdump")), flag, f.name], check=True, capture_output=True,
                                  text=True).stdout

        sass = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", dump("-sass"), re.MULTILINE))
        return aot.parse_res_usage(dump("-res-usage")) | {"shared_bytes": compiled.metadata.shared,
                                                          "sass_instructions": sass}


def compile_report(variants, compile_fn=compile_variant):
    for variant in variants:
        only = parse(variant).get("only_d")
        for head_dim in (64, 128):
            if only and head_dim != only:
                continue
            try:
                usage = resource_usage(compile_fn(variant, head_dim))
            except Exception as e:  # noqa: BLE001 - one variant's failure must not hide the others
                usage = f"FAILED: {type(e).__name__}: {str(e)[-300:]}"
            print(f"{variant} d{head_dim}: {usage}", flush=True)


def inputs(b, sq, sk, h, hk, d, kind):
    """kind: plain; packed (q, k, v strided views of one (b, s, 3, h, d) tensor); poison (NaN in the K/V of every
    sequence but the first, whose outputs alone are compared: a read past a sequence shows)."""
    import torch
    if kind == "packed":
        qkv = torch.randn(b, sq, 3, h, d, device="cuda", dtype=torch.bfloat16)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    if kind == "poison":
        k[1:] = float("nan")
        v[1:] = float("nan")
    return q, k, v


# (batch, seqlen_q, seqlen_k, heads, kv heads, kind), each with every mask of CHECK_MASKS. The last one gives a
# persistent walk several tiles per program, some of them without keys (causal, seqlen_q > seqlen_k).
CHECK_SHAPES = ((2, 128, 128, 4, 4, "plain"), (2, 1000, 1000, 3, 3, "plain"), (1, 4096, 4096, 2, 2, "plain"),
                (4, 2048, 2048, 8, 8, "plain"), (2, 1000, 1000, 8, 2, "plain"), (2, 777, 777, 4, 4, "packed"),
                (2, 1000, 1000, 2, 2, "poison"), (2, 300, 1100, 4, 2, "plain"), (2, 1100, 300, 4, 4, "plain"),
                (1, 1, 513, 2, 2, "plain"), (8, 1100, 300, 8, 8, "plain"))
# The ab mode's check (its point is the timing): CHECK_SHAPES without the long sequences.
QUICK_SHAPES = tuple(shape for shape in CHECK_SHAPES if max(shape[1:3]) <= 1100)
# (causal, window_size): none, causal, sliding windows (some rows of seqlen_q > seqlen_k see no key).
CHECK_MASKS = ((False, (-1, -1)), (True, (-1, -1)), (False, (100, 0)), (False, (37, 200)), (True, (256, -1)))


def check_calls(variant, shapes=CHECK_SHAPES):
    """The check's calls: (the line's label, the variant's keyword arguments, q, k, v, the sequences compared,
    causal, window) for every head dim the variant takes, shape of `shapes` and mask of CHECK_MASKS."""
    import torch

    kw = parse(variant)
    only = kw.pop("only_d", None)
    for d in (64, 128):
        if only and d != only:
            continue
        for b, sq, sk, h, hk, kind in shapes:
            for causal, window in CHECK_MASKS:
                torch.manual_seed(0)
                q, k, v = inputs(b, sq, sk, h, hk, d, kind)
                label = f"{variant} d{d} b{b} q{sq} k{sk} h{h}/{hk} {kind} causal={int(causal)} window={window}"
                yield label, kw, q, k, v, 1 if kind == "poison" else b, causal, window


def check(variant, shapes=CHECK_SHAPES) -> bool:
    """The variant against the float64 reference (fa2rt.reference); it passes where its error is at most twice that
    of fa2rt's own kernel on the same call (+1e-3) and its LSE is within 1e-3 (both +inf for rows without keys)."""
    import torch

    import fa2rt
    from fa2rt.reference import attention_reference
    ok_all = True
    for label, kw, q, k, v, n, causal, window in check_calls(variant, shapes):
        ref, ref_lse = attention_reference(q[:n], k[:n], v[:n], causal=causal, window_size=window)
        o, lse = fwd_ws.forward(q, k, v, causal, window, **kw)
        err = (o[:n].double() - ref).abs().max().item()
        same_inf = torch.equal(lse[:n].isinf(), ref_lse.isinf())
        finite = ~ref_lse.isinf()
        lse_err = (lse[:n].double()[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
        theirs = fa2rt.attention(q[:n], k[:n], v[:n], causal=causal, window_size=window)
        theirs = (theirs.double() - ref).abs().max().item()
        ok = err <= 2 * theirs + 1e-3 and lse_err < 1e-3 and same_inf
        ok_all &= ok
        print(f"{label}: err {err:.2e} (fa2rt {theirs:.2e}) lse {lse_err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    return ok_all


def grid_points():
    """The FA2 grid (bf16, 16k tokens per point, hidden 2048): (head dim, heads, batch, seqlen, causal, q, k, v)."""
    import torch

    for d, h in ((64, 32), (128, 16)):
        for causal in (False, True):
            for s in (512, 1024, 2048, 4096, 8192, 16384):
                b = 16384 // s
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                yield d, h, b, s, causal, q, k, v


def variant_runs(variants, d, q, k, v, causal, module=fwd_ws, suffix="", **call):
    """{variant + suffix: a call of module's forward with that schedule (and the call's other keyword arguments,
    window_size or softmax_scale)} for the variants that take head dim d."""
    runs = {}
    for variant in variants:
        kw = parse(variant)
        if kw.pop("only_d", d) == d:
            runs[variant + suffix] = functools.partial(module.forward, q, k, v, causal, **call, **kw)
    return runs


def bench(out, variants):
    import fa2rt
    from fa2rt.bench import common
    rows = []
    with common.kernel_forced():
        for d, h, b, s, causal, q, k, v in grid_points():
            runs = variant_runs(variants, d, q, k, v, causal)
            runs["fa2rt"] = functools.partial(fa2rt.attention, q, k, v, causal=causal)
            runs["sdpa_cudnn"] = common.sdpa_call(q, k, v, causal, "sdpa_cudnn")
            runs["sdpa_flash"] = common.sdpa_call(q, k, v, causal, "sdpa_flash")
            flops = common.fwd_flops(b, h, s, d, causal)
            row = {"d": d, "h": h, "b": b, "s": s, "causal": causal,
                   "tflops": {name: flops / ms / 1e9 for name, ms in common.time_interleaved(runs).items()}}
            rows.append(row)
            print(f"d{d} causal={int(causal)} s{s:5d}: "
                  + " ".join(f"{n}={t:.0f}" for n, t in row["tflops"].items()), flush=True)
    Path(out).write_text(json.dumps({"environment": common.environment(), "variants": variants, "rows": rows},
                                    indent=1))
    summary(rows, variants)


def load_source(path):
    """Another copy of fwd_ws.py (an older revision, say) as a module of its own."""
    spec = importlib.util.spec_from_file_location(f"fwd_ws_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AB_ROUNDS = 3


def ab(out, old_path, variants) -> bool:
    """This fwd_ws.py against the copy at old_path, each variant's schedule in both: the quick check of this one,
    then per grid point AB_ROUNDS rounds of both taking turns call by call, each one's fastest round kept (the v11/v14
    method of gluon-ws-notes.md, which timed them one after another in each round). Returns whether the check
    passed."""
    from fa2rt.bench import common
    old = load_source(old_path)
    passed = all([check(variant, QUICK_SHAPES) for variant in variants])
    print(f"check: {'passed' if passed else 'FAILED'}", flush=True)
    rows = []
    for d, h, b, s, causal, q, k, v in grid_points():
        runs = variant_runs(variants, d, q, k, v, causal, old, " old") | variant_runs(variants, d, q, k, v, causal)
        times = {name: [] for name in runs}
        for _ in range(AB_ROUNDS):
            for name, ms in common.time_interleaved(runs, warmup=10, rep=40).items():
                times[name].append(ms)
        flops = common.fwd_flops(b, h, s, d, causal)
        row = {"d": d, "h": h, "b": b, "s": s, "causal": causal, "ms": times,
               "tflops": {name: flops / min(t) / 1e9 for name, t in times.items()}}
        rows.append(row)
        print(f"d{d} causal={int(causal)} s{s:5d}: "
              + " ".join(f"{n}={t:.0f}" for n, t in row["tflops"].items()), flush=True)
    Path(out).write_text(json.dumps({"environment": common.environment(), "old": str(old_path), "variants": variants,
                                     "check_passed": passed, "rows": rows}, indent=1))
    print("\nnew / old TFLOP/s per head dim / causal: geomean (min, max)")
    for variant in variants:
        for d in (64, 128):
            for causal in (False, True):
                ratios = [r["tflops"][variant] / r["tflops"][variant + " old"] for r in rows
                          if r["d"] == d and r["causal"] == causal and variant in r["tflops"]]
                if ratios:
                    print(f"  {variant:28s} d{d} causal={int(causal)}: {common.geomean(ratios):.3f} "
                          f"({min(ratios):.3f}, {max(ratios):.3f})")
    return passed


# (label, seqlen_k, causal, window_size, softmax_scale sign) at seqlen_q 512: keys per tile 1-4 blocks unmasked, the
# causal walk (1-4 blocks, the last masked), every block masked (a negative scale), a causal band of 2 blocks.
PROBE_CALLS = (("keys128", 128, False, (-1, -1), 1), ("keys256", 256, False, (-1, -1), 1),
               ("keys384", 384, False, (-1, -1), 1), ("keys512", 512, False, (-1, -1), 1),
               ("causal", 512, True, (-1, -1), 1), ("masked512", 512, False, (-1, -1), -1),
               ("window127", 512, True, (127, 0), 1))


def _warm_ms(fn, calls=50):
    """Milliseconds per call of calls back-to-back calls (the L2 keeps what the last call left)."""
    import torch

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def probe(out, variants):
    """Where a short causal tile's time goes: at seqlen_q 512 (the FA2 grid's batch and heads) each variant, fa2rt's
    images and cuDNN on PROBE_CALLS, timed as the grid times (cold L2) and back-to-back (warm)."""
    import torch

    import fa2rt
    from fa2rt.bench import common
    rows = []
    with common.kernel_forced():
        for d, h in ((128, 16), (64, 32)):
            for label, seqlen_k, causal, window, sign in PROBE_CALLS:
                q = torch.randn(32, 512, h, d, device="cuda", dtype=torch.bfloat16)
                k, v = (torch.randn(32, seqlen_k, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                scale = sign * d ** -0.5
                runs = variant_runs(variants, d, q, k, v, causal, window_size=window, softmax_scale=scale)
                runs["fa2rt"] = functools.partial(fa2rt.attention, q, k, v, causal=causal, window_size=window,
                                                  softmax_scale=scale)
                if window == (-1, -1) and sign > 0:
                    runs["sdpa_cudnn"] = common.sdpa_call(q, k, v, causal, "sdpa_cudnn")
                row = {"d": d, "label": label, "cold_us": {}, "warm_us": {}}
                for name, fn in runs.items():
                    row["cold_us"][name] = common.time_ms(fn) * 1e3
                    row["warm_us"][name] = _warm_ms(fn) * 1e3
                rows.append(row)
                print(f"d{d} {label:10s} " + " ".join(f"{n}={row['cold_us'][n]:.1f}/{row['warm_us'][n]:.1f}"
                                                      for n in runs), flush=True)
    Path(out).write_text(json.dumps({"environment": common.environment(), "variants": variants, "rows": rows},
                                    indent=1))


def summary(rows, variants):
    from fa2rt.bench.common import geomean
    print("\ngeomean TFLOP/s ratio per head dim / causal: against cuDNN (min), against fa2rt")
    for name in [*variants, "fa2rt", "sdpa_flash"]:
        for d in (64, 128):
            for causal in (False, True):
                sel = [r["tflops"] for r in rows if r["d"] == d and r["causal"] == causal and name in r["tflops"]]
                if not sel:
                    continue
                to_cudnn = [t[name] / t["sdpa_cudnn"] for t in sel]
                to_fa2rt = [t[name] / t["fa2rt"] for t in sel]
                print(f"  {name:28s} d{d} causal={int(causal)}: {geomean(to_cudnn):.3f} (min {min(to_cudnn):.3f})"
                      f"  {geomean(to_fa2rt):.3f}")


def _grads(fn, q, k, v, dout, **opts):
    """(dq, dk, dv) of fn(q, k, v, **opts) (its output, or the first of a tuple) for the output gradient dout."""
    import torch

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **opts)
    out = out[0] if isinstance(out, tuple) else out
    return [g.detach() for g in torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))]


def check_bwd(variant) -> bool:
    """dK and dV (and dQ with dq1) of the variant (given fa2rt's forward output and LSE) against float64 autograd of
    the reference; passes where each error is at most twice that of fa2rt's own backward on the same call (+1e-3 of
    the largest reference gradient)."""
    import torch

    import fa2rt
    from fa2rt.bench import common
    from fa2rt.reference import attention_reference
    ok_all = True
    with common.kernel_forced():
        for label, kw, q, k, v, n, causal, window in check_calls(variant):
            dout = torch.randn_like(q)
            first = (q[:n], k[:n], v[:n], dout[:n])
            ref = _grads(attention_reference, *first, causal=causal, window_size=window)
            theirs = _grads(fa2rt.attention, *first, causal=causal, window_size=window)
            out, lse = fa2rt.attention(q, k, v, causal=causal, window_size=window, return_lse=True)
            mine = bwd_ws.backward(q, k, v, out, dout, lse, causal, window, **kw)
            line, ok = [], True
            for name, r, t, m in zip(("dq", "dk", "dv"), ref, theirs, mine, strict=True):
                if m is None:
                    continue
                err = (m[:n].double() - r).abs().max().item()
                their = (t.double() - r).abs().max().item()
                ok &= err <= 2 * their + 1e-3 * max(1.0, r.abs().max().item())
                line.append(f"{name} {err:.2e} (fa2rt {their:.2e})")
            ok_all &= ok
            print(f"{label}: {', '.join(line)} {'ok' if ok else 'FAIL'}", flush=True)
    return ok_all


def _backward_ms(fn, q, k, v, dout, **opts) -> float:
    """Milliseconds of fn's backward alone: forward+backward minus forward."""
    import torch

    from fa2rt.bench import common
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    both = common.time_ms(lambda: torch.autograd.grad(fn(qg, kg, vg, **opts), (qg, kg, vg), dout))
    with torch.no_grad():
        return both - common.time_ms(functools.partial(fn, q, k, v, **opts))


def bench_bwd(out, variants):
    """Backward time per point (ms, the FA2 grid): each variant's kernel (dK/dV alone, or with dq1 the whole backward:
    the kernel with delta, the accumulator's zeroing and conversion in torch, and VARIANT:kernel the kernel alone),
    fa2rt's whole backward as its installed images run it (routing off) and cuDNN's (as fa2rt routes to it), in one
    process."""
    import torch

    import fa2rt
    from fa2rt import routing
    from fa2rt.bench import common
    rows = []
    with common.kernel_forced():
        for d, h, b, s, causal, q, k, v in grid_points():
            dout = torch.randn_like(q)
            o, lse = fa2rt.attention(q, k, v, causal=causal, return_lse=True)
            ms = {}
            for variant in variants:
                kw = parse(variant)
                if kw.pop("only_d", d) == d:
                    ms[variant] = common.time_ms(functools.partial(bwd_ws.backward, q, k, v, o, dout,
                                                                   lse, causal, **kw))
                    if kw.get("dq"):  # the kernel alone, without torch's delta, zeroing and conversion
                        launch, _ = bwd_ws.launcher(q, k, v, o, dout, lse, causal, **kw)
                        ms[variant + ":kernel"] = common.time_ms(launch)
            ms["fa2rt"] = _backward_ms(fa2rt.attention, q, k, v, dout, causal=causal)
            ms["sdpa_cudnn"] = _backward_ms(functools.partial(routing.run, "sdpa_cudnn"), q, k, v, dout,
                                            causal=causal, softmax_scale=d ** -0.5)
            rows.append({"d": d, "h": h, "b": b, "s": s, "causal": causal, "ms": ms})
            print(f"d{d} causal={int(causal)} s{s:5d}: " + " ".join(f"{n}={t:.3f}" for n, t in ms.items()),
                  flush=True)
    Path(out).write_text(json.dumps({"environment": common.environment(), "variants": variants, "rows": rows},
                                    indent=1))


def main(argv):
    t0 = time.time()
    if argv[0] == "compile":
        compile_report(argv[1:])
    elif argv[0] == "check":
        ok = check(argv[1])
        print(f"{argv[1]}: {'passed' if ok else 'FAILED'} ({time.time() - t0:.0f} s)")
        return 0 if ok else 1
    elif argv[0] == "bench":
        bench(argv[1], argv[2:])
    elif argv[0] == "ab":
        return 0 if ab(argv[1], argv[2], argv[3:]) else 1
    elif argv[0] == "probe":
        probe(argv[1], argv[2:])
    elif argv[0] == "compile-bwd":
        compile_report(argv[1:], compile_bwd_variant)
    elif argv[0] == "check-bwd":
        ok = check_bwd(argv[1])
        print(f"{argv[1]}: {'passed' if ok else 'FAILED'} ({time.time() - t0:.0f} s)")
        return 0 if ok else 1
    elif argv[0] == "bench-bwd":
        bench_bwd(argv[1], argv[2:])
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
