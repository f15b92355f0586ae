"""python -m fa2rt.doctor: what will run on this machine, why, and whether it computes the right numbers.

Probes in layers (driver libraries, devices, torch's view, ROCm through hip-python, installed builds, decisions for
common problems, a numerical check), each guarded so a missing layer is reported rather than fatal.

Exit codes (EXIT_CODES): 0 healthy; 1 a numerical check failed; 2 a GPU is present but no installed image runs
on it; 3 --require names a vendor with no usable GPU here; 4 internal error of the doctor itself.
"""

import argparse
import json
import sys
import traceback
import warnings

import torch

from . import _C, __version__, builds, config, devices, hip_probe, report
from .api import attention, explain
from .policy import FallbackWarning
from .reference import attention_reference

DOCTOR_SCHEMA = 1
EXIT_HEALTHY, EXIT_CHECK_FAILED, EXIT_NO_USABLE_BUILD, EXIT_REQUIRE_UNMET, EXIT_INTERNAL = 0, 1, 2, 3, 4
EXIT_CODES = {
    EXIT_HEALTHY: "healthy",
    EXIT_CHECK_FAILED: "a numerical check failed",
    EXIT_NO_USABLE_BUILD: "GPU present but no usable kernel build",
    EXIT_REQUIRE_UNMET: "--require not met",
    EXIT_INTERNAL: "internal error",
}
# Relative Frobenius error against the float64 reference that a path must stay under, per dtype.
CHECK_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}
CHECK_SHAPE = dict(batch=2, seqlen_q=257, seqlen_k=300, nheads=4, nheads_k=2)
DECISION_GRID = [(dtype, d, causal) for dtype in (torch.float16, torch.bfloat16) for d in (64, 128)
                 for causal in (False, True)]
DECISION_SEQLEN = 1024


def _layer(fn):
    """Run one probe layer; an exception becomes the layer's error instead of ending the doctor."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the doctor reports every failure as data
        return {"error": f"{type(exc).__name__}: {exc}"}


def torch_view() -> dict:
    view = {"version": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
            "gpu_available": torch.cuda.is_available(), "devices": []}
    for i in range(torch.cuda.device_count() if view["gpu_available"] else 0):
        props = torch.cuda.get_device_properties(i)
        view["devices"].append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                                "gcnArchName": getattr(props, "gcnArchName", None)})
    return view


def rocm_view() -> dict:
    """ROCm as hip-python sees it (state, HIP runtime/driver versions, devices and the installed builds each runs)."""
    installed = {}
    for row in builds.current_build().rows:
        installed[row["arch"]] = installed.get(row["arch"], 0) + 1
    return hip_probe.probe(installed, _C.arch_compat_table())


def verify_build() -> dict:
    """The kernel sources (packages, a source install, FA2RT_KERNEL_DIR), each with its files hashed now."""
    build = builds.current_build()
    sources = report.kernel_sources(build)
    out = {"directory": str(build.directory), "error": build.error, "images": len(build.rows), "archs": {},
           "layouts": {}, "bad_files": [f"{s['directory']}/{bad}" for s in sources for bad in s["sha256"]["bad_files"]],
           "sources": sources}
    for row in build.rows:
        out["archs"][row["arch"]] = out["archs"].get(row["arch"], 0) + 1
        for layout in row.get("layouts", ()):
            out["layouts"][layout] = out["layouts"].get(layout, 0) + 1
    return out


def _render_sources(build: dict, devices: list) -> list[str]:
    """One line per kernel source, then the pip line of every device whose images are missing."""
    lines = [f"  {build['images']} images {build.get('archs', {})} {build.get('layouts', {})}"
             + (f"; {build['error']}" if build.get("error") else "")]
    for s in build.get("sources", []):
        what = f"{s['name']} {s['version']}" if s["version"] else s["name"]
        if s["status"] == "loaded":
            sha = s["sha256"]
            sha_text = f"sha256 ok ({sha['files']} files)" if sha["state"] == "ok" else f"sha256: {sha['state']}"
            lines.append(f"  {what}: {', '.join(s['archs'])}, {s['images']} images, {sha_text} ({s['directory']})")
        elif s["status"] != "absent" or s["kind"] != "source install":
            lines.append(f"  {what}: {s['status']}: {s['reason']}")
    for d in devices:
        if d.get("missing_package"):
            lines.append(f"  {d['vendor']}:{d['index']} ({d['arch']}) has no kernel images: "
                         f"{d['missing_package']['text']}")
    return lines


def _targets() -> list[torch.device]:
    """The devices to decide and check on: every visible GPU, else the CPU."""
    if torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


def _inputs(device, dtype, head_dim, seqlen_q, seqlen_k, batch=1, nheads=8, nheads_k=8, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda n, h: torch.randn(batch, n, h, head_dim, generator=gen, dtype=torch.float32)  # noqa: E731
    return [make(n, h).to(device=device, dtype=dtype) for n, h in
            ((seqlen_q, nheads), (seqlen_k, nheads_k), (seqlen_k, nheads_k))]


def decisions(device) -> list[dict]:
    """What runs for each entry of DECISION_GRID, as a dense call and as a varlen call (the same tokens packed as one
    sequence): fa2rt's own kernels, with the routing table off (the devices' routing line says what it routes)."""
    rows = []
    with config.overridden(config.ROUTING, "0"):
        for dtype, head_dim, causal in DECISION_GRID:
            rows += _decisions(device, dtype, head_dim, causal)
    return rows


def _decisions(device, dtype, head_dim, causal) -> list[dict]:
    q, k, v = _inputs(device, dtype, head_dim, DECISION_SEQLEN, DECISION_SEQLEN)
    cu = torch.tensor([0, DECISION_SEQLEN], dtype=torch.int32, device=device)
    packed = (q[0], k[0], v[0], cu, cu, DECISION_SEQLEN, DECISION_SEQLEN)
    return [{"device": str(device), "dtype": str(dtype).removeprefix("torch."), "head_dim": head_dim, "causal": causal,
             "layout": layout, "path": d.path, "image": d.image, "mode": d.mode, "reason": d.reason,
             "message": d.message}
            for layout, d in (("dense", explain(q, k, v, causal=causal)), ("varlen", explain(*packed, causal=causal)))]


def numerical_check(device, dtype, head_dim, causal, seed, transform=None) -> tuple[dict, torch.Tensor]:
    """One check on seeded inputs of CHECK_SHAPE against the float64 reference: its row and the output. transform
    (the fleet doctor's fault injection) is applied to the output before it is compared."""
    s = CHECK_SHAPE
    q, k, v = _inputs(device, dtype, head_dim, s["seqlen_q"], s["seqlen_k"], s["batch"], s["nheads"], s["nheads_k"],
                      seed=seed)
    path = explain(q, k, v, causal=causal)
    out, lse = attention(q, k, v, causal=causal, return_lse=True)
    if transform is not None:
        out = transform(out)
    ref, ref_lse = attention_reference(q, k, v, causal=causal)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    finite = ref_lse.isfinite()
    lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
    ok = bool(torch.isfinite(out).all()) and err < CHECK_TOLERANCE[dtype] and lse_err < 1e-2
    row = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "head_dim": head_dim, "causal": causal,
           "path": path.path, "image": path.image, "reason": path.reason, "rel_error": err,
           "lse_max_abs_error": lse_err, "tolerance": CHECK_TOLERANCE[dtype], "ok": ok}
    return row, out


def numerical_checks(device) -> list[dict]:
    dtypes = (torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    return [numerical_check(device, dtype, head_dim, causal, seed=head_dim + causal)[0] for dtype in dtypes
            for head_dim in (64, 128) for causal in (False, True)]


def device_facts(device, info=None) -> dict:
    """One device as data, what the fleet doctor gathers per rank: report.device_entry's facts (name, arch, SM/CU
    count, the images it runs, the short-sequence rule in force) plus its memory, driver and runtime versions and,
    when fa2rt cannot use it, why. info: a DeviceInfo standing in for the device (the fleet's test knob)."""
    why = ""
    if info is None:
        info, _, why = devices.describe(device)
    entry = report.device_entry(info, builds.current_build())
    real_gpu = device.type == "cuda" and info.vendor in report.VENDORS and not why
    status = _C.backend_status(info.vendor) if info.vendor in report.VENDORS else {}
    runtime = {"cuda": torch.version.cuda, "rocm": getattr(torch.version, "hip", None)}
    entry.update({"memory_bytes": torch.cuda.get_device_properties(device).total_memory if real_gpu else None,
                  "driver_version": status.get("driver_version"), "runtime_version": runtime.get(info.vendor),
                  "unusable": why})
    return entry


def diagnose(require: str | None) -> dict:
    statuses, probed = report.probe_devices()
    build = builds.current_build()
    result = {
        "schema_version": DOCTOR_SCHEMA,
        "fa2rt_version": __version__,
        "drivers": statuses,
        "devices": [report.device_entry(info, build) for info in probed],
        "torch": _layer(torch_view),
        "rocm": _layer(rocm_view),
        "build": _layer(verify_build),
        "decisions": [],
        "checks": [],
    }
    with warnings.catch_warnings():
        # The report states every path it ran; the once-per-reason warnings would only repeat it.
        warnings.simplefilter("ignore", FallbackWarning)
        for device in _targets():
            result["decisions"] += decisions(device)
            result["checks"] += numerical_checks(device)
    result["verdict"] = verdict(result, require)
    return result


def verdict(result: dict, require: str | None) -> dict:
    problems, code = [], EXIT_HEALTHY
    failed = [c for c in result["checks"] if not c["ok"]]
    if failed:
        code = EXIT_CHECK_FAILED
        problems += [f"numerical check failed: {c['dtype']} d{c['head_dim']} causal={c['causal']} on "
                     f"{c['device']}: rel error {c['rel_error']:.2e} (tolerance {c['tolerance']:.0e})" for c in failed]
    gpu_present = bool(result["torch"].get("gpu_available")) or bool(result["devices"])
    gpu_kernels = [d for d in result["decisions"] if d["device"].startswith("cuda") and d["path"] == "kernel"]
    if gpu_present and not gpu_kernels:
        code = code or EXIT_NO_USABLE_BUILD
        install = sorted({d["missing_package"]["text"] for d in result["devices"] if d.get("missing_package")})
        problems.append("a GPU is present but no installed kernel image runs on it (every call falls back to SDPA)"
                        + "".join(f"; {text}" for text in install))
    if require and not any(d["vendor"] == require for d in result["devices"]):
        code = EXIT_REQUIRE_UNMET
        problems.append(f"--require {require}: no usable {require} GPU found" + _require_detail(result, require))
    if result["build"].get("bad_files"):
        code = code or EXIT_CHECK_FAILED
        problems.append(f"{len(result['build']['bad_files'])} kernel files do not match their sha256")
    return {"exit_code": code, "status": EXIT_CODES[code], "problems": problems}


def _require_detail(result: dict, vendor: str) -> str:
    """What was found instead of a usable GPU: fa2rt's own driver probe and, for rocm, hip-python's state."""
    status = result.get("drivers", {}).get(vendor, {})
    shim = status.get("error") if not status.get("available", True) else f"{status.get('device_count', 0)} device(s)"
    detail = f"; fa2rt's {vendor} driver probe: {shim}"
    if vendor == "rocm":
        rocm = result.get("rocm") or {}
        state = f"{rocm['state']}: {rocm['summary']}" if "state" in rocm else f"probe failed: {rocm.get('error')}"
        detail = f"; hip-python state {state}" + detail
    return detail


def _render_rocm(rocm: dict) -> list[str]:
    if "state" not in rocm:
        return [f"  probe failed: {rocm.get('error')}"]
    lines = [f"  {rocm['state']}: {rocm['summary']}"]
    lines += [f"  {rocm[key]}" for key in ("driver_error", "init_error") if rocm.get(key)]
    for d in rocm["devices"]:
        if d.get("error"):
            lines.append(f"  device {d['index']}: {d['error']}")
            continue
        runs = ", ".join(f"{b['arch']} ({b['mode']}, {b['images']} images)" for b in d["matching_builds"])
        lines.append(f"  device {d['index']}: {d['name']} arch {d['arch']} (raw {d['arch_raw']}); installed builds "
                     f"it runs: {runs or 'none'}")
    return lines


def _short_sequence_text(rule: dict) -> str:
    n, source = rule["min_seqlen_k"], rule["source"]
    head = f"seqlen_k < {n} falls back to SDPA" if n else "no fallback by length"
    if source == "measured":
        where = f"{rule.get('device', '?')}, {rule.get('date', '?')[:10]}"
        return f"{head} (measured on {where}; the JSON report has the note)"
    return f"{head} ({'set by ' + source if source == config.MIN_SEQLEN else source})"


def _routing_text(summary: dict) -> str:
    if summary["source"] != "measured":
        return "no measured routing table for this arch: fa2rt's kernels run"
    state = "on" if summary["enabled"] else f"off ({config.ROUTING}=0)"
    return (f"{state}; {summary['routed']} of {summary['classes']} measured problem classes go to a faster SDPA "
            f"backend (measured on {summary.get('device', '?')}, {str(summary.get('date', '?'))[:10]}, cuDNN "
            f"{summary.get('cudnn', '?')}; fa2rt.explain names it per call)")


def render_text(result: dict) -> str:
    lines = [f"fa2rt {result['fa2rt_version']} doctor"]
    lines.append("\n[drivers]")
    for vendor, st in result["drivers"].items():
        state = f"ok, driver {st['driver_version']}, {st['device_count']} device(s)" if st["available"] else (
            f"unavailable: {st['error']}")
        lines.append(f"  {vendor}: {state}")
    lines.append("\n[devices]")
    for d in result["devices"] or [{"name": "none"}]:
        if "arch" not in d:
            lines.append("  no GPU visible to the drivers")
            continue
        compat = ", ".join(f"{c['arch']} ({c['mode']})" for c in d["compatible_archs"]) or "none"
        lines.append(f"  {d['vendor']}:{d['index']} {d['name']} arch {d['arch']} (raw {d['arch_raw']}), "
                     f"{d['multiprocessors']} SMs/CUs, shared opt-in {d['shared_optin_bytes']} B; runs builds: "
                     f"{compat}; {len(d['usable_images'])} usable images")
        lines.append(f"    short sequences: {_short_sequence_text(d['short_sequence'])}")
        lines.append(f"    routing: {_routing_text(d['routing'])}")
    t = result["torch"]
    lines.append("\n[torch]")
    if t.get("error"):
        lines.append(f"  {t['error']}")
    else:
        gpus = ", ".join(f"{d['index']}: {d['name']} ({d['gcnArchName'] or d['capability']})" for d in t["devices"])
        lines.append(f"  torch {t['version']} (cuda {t['cuda']}, hip {t['hip']}); GPUs: {gpus or 'none'}")
    lines.append("\n[rocm] (through hip-python)")
    lines += _render_rocm(result["rocm"])
    lines.append("\n[build] (kernel packages and other image sources)")
    lines += [f"  {result['build']['error']}"] if "sources" not in result["build"] else _render_sources(
        result["build"], result["devices"])
    lines.append("\n[decisions] (seqlen 1024, 8 heads)")
    for d in result["decisions"]:
        what = f"{d['image']} ({d['mode']})" if d["path"] == "kernel" else f"SDPA fallback [{d['reason']}]"
        lines.append(f"  {d['device']:8} {d['dtype']:9} d{d['head_dim']:<4} causal={d['causal']!s:5} "
                     f"{d['layout']:6} -> {what}")
    lines.append("\n[numerical check] (against a float64 reference)")
    for c in result["checks"]:
        mark = "ok  " if c["ok"] else "FAIL"
        where = c["image"] or "SDPA fallback"
        lines.append(f"  {mark} {c['device']:8} {c['dtype']:9} d{c['head_dim']:<4} causal={c['causal']!s:5} "
                     f"rel error {c['rel_error']:.2e} (tol {c['tolerance']:.0e}) via {where}")
    v = result["verdict"]
    lines.append(f"\n[verdict] exit {v['exit_code']}: {v['status']}")
    lines += [f"  - {p}" for p in v["problems"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fa2rt.doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--require", choices=report.VENDORS, help="fail (exit 3) unless a GPU of this vendor is usable")
    parser.add_argument("--fleet", action="store_true", help="check every rank of a torch.distributed job (run under "
                        "torchrun or with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set); exit codes in fa2rt.fleet")
    args = parser.parse_args(argv)
    if args.fleet:
        from . import fleet  # torch.distributed only for the fleet mode

        return fleet.main(as_json=args.json, require=args.require)
    try:
        result = diagnose(args.require)
    except Exception as exc:  # noqa: BLE001 - an internal error still ends with a report and its own exit code
        result = {"schema_version": DOCTOR_SCHEMA, "fa2rt_version": __version__,
                  "verdict": {"exit_code": EXIT_INTERNAL, "status": EXIT_CODES[EXIT_INTERNAL],
                              "problems": [f"{type(exc).__name__}: {exc}"], "traceback": traceback.format_exc()}}
        print(json.dumps(result, indent=1) if args.json else f"fa2rt doctor internal error: {exc}\n"
              f"{result['verdict']['traceback']}", file=sys.stdout if args.json else sys.stderr)
        return EXIT_INTERNAL
    print(json.dumps(result, indent=1) if args.json else render_text(result))
    return result["verdict"]["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
