"""Runs fuzz cases on the GPU, one JSON line per case on stdout: `FUZZ {...}`. --family picks the cases:
`attention` (tests/fuzz_cases.py: dense, varlen and paged prefill) or `kvcache` (tests/fuzz_kvcache.py: KV-cache
calls, their GPU draw).

    python tests/gpu/fuzz_worker.py [--family attention|kvcache] --start N [--stop M] [--only I,J,...] [--no-check]

A case ends as "pass", "fail" (wrong result or an unexpected exception: the run goes on) or "fault" (a CUDA error:
the context is lost, so the worker reports it and exits 3; tests/gpu/test_fuzz_gpu.py starts a fresh worker at the
next case). FA2RT_FORCE_ARCH in the environment picks the images (sm80/sm89 through their PTX). --no-check runs the
calls without the float64 check, for compute-sanitizer (whose instrumentation makes the reference slow).
"""

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fuzz_kvcache  # noqa: E402
import torch  # noqa: E402
from fuzz_cases import (  # noqa: E402
    VarlenCase,
    all_cases,
    build,
    build_varlen,
    call,
    call_varlen,
    check,
    check_varlen,
    explain,
    explain_varlen,
)

import fa2rt  # noqa: E402

FAULT_MARKERS = ("CUDA error", "illegal memory access", "misaligned address", "unspecified launch failure",
                 "CUDA_ERROR", "device-side assert")
FAULT_EXIT = 3


def _is_fault(exc: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or any(m in str(exc) for m in FAULT_MARKERS)


# (build, explain, call, check) for dense cases (False) and varlen ones (True)
ATTENTION_KINDS = {False: (build, explain, call, check),
                   True: (build_varlen, explain_varlen, call_varlen, check_varlen)}


def run_attention(case, do_check: bool) -> dict:
    make, decide, run, verify = ATTENTION_KINDS[isinstance(case, VarlenCase)]
    built = make(case, "cuda")
    if getattr(case, "malformed", None):
        # Unchecked malformed cu_seqlens (no sync on the GPU): any numbers, or the fallback's ValueError, but no fault.
        try:
            run(case, built)
        except ValueError as err:
            return {"path": "malformed", "raised": str(err)[:200]}
        torch.cuda.synchronize()
        return {"path": "malformed"}
    decision = decide(case, built)
    out, lse = run(case, built)
    torch.cuda.synchronize()
    result = {"path": decision.path, "image": decision.image, "reason": decision.reason,
              "copies": [name for name, _ in decision.copies]}
    if do_check:
        result["errors"] = verify(case, built, out, lse)
    return result


def run_kvcache(case, do_check: bool) -> dict:
    """One KV-cache call (appending in place) against the float64 reference of the same arguments, taken before it."""
    args, opts = fuzz_kvcache.build(case, "cuda"), fuzz_kvcache.options(case, "cuda")
    ref = fuzz_kvcache.reference(case, args, opts) if do_check else None
    q, k_cache, v_cache = (args.pop(name) for name in ("q", "k_cache", "v_cache"))
    decision = fa2rt.explain_with_kvcache(q, k_cache, v_cache, **args, **opts)
    out, lse = fa2rt.attention_with_kvcache(q, k_cache, v_cache, **args, **opts, return_lse=True)
    torch.cuda.synchronize()
    result = {"path": decision.path, "image": decision.image, "reason": decision.reason,
              "message": decision.message}
    if do_check:
        found = fuzz_kvcache.errors(case, out, lse, k_cache, v_cache, ref)
        assert found["ok"], found["errors"]
        result["errors"] = found["errors"]
    return result


# per family: (its cases, how one runs)
FAMILIES = {"attention": (all_cases, run_attention), "kvcache": (fuzz_kvcache.gpu_cases, run_kvcache)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=list(FAMILIES), default="attention")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=None)
    ap.add_argument("--only", default="", help="comma-separated case indices (instead of --start/--stop)")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    make_cases, run_one = FAMILIES[args.family]
    cases = make_cases()
    if args.only:
        wanted = {int(i) for i in args.only.split(",")}
        cases = [c for c in cases if c.index in wanted]
    else:
        cases = cases[args.start:args.stop]
    warnings.simplefilter("ignore", fa2rt.FallbackWarning)
    for case in cases:
        record = {"index": case.index, "id": case.id}
        try:
            record.update(run_one(case, not args.no_check), status="pass")
        except BaseException as exc:  # noqa: BLE001 - every outcome is reported, a fault ends the worker
            fault = _is_fault(exc)
            record.update(status="fault" if fault else "fail", error=f"{type(exc).__name__}: {exc}"[:2000],
                          trace=traceback.format_exc()[-3000:])
            print("FUZZ " + json.dumps(record), flush=True)
            if fault:
                return FAULT_EXIT
            continue
        print("FUZZ " + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
