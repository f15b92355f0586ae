"""Runs fuzz cases (tests/fuzz_cases.py) on the GPU, one JSON line per case on stdout: `FUZZ {...}`.

    python tests/gpu/fuzz_worker.py --start N [--stop M] [--only I,J,...] [--no-check]

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


# (build, explain, call, check) per case family
FAMILIES = {False: (build, explain, call, check), True: (build_varlen, explain_varlen, call_varlen, check_varlen)}


def run_one(case, do_check: bool) -> dict:
    make, decide, run, verify = FAMILIES[isinstance(case, VarlenCase)]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=None)
    ap.add_argument("--only", default="", help="comma-separated case indices (instead of --start/--stop)")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    cases = all_cases()
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
