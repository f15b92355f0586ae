"""Ahead-of-time compiler: Triton kernel -> per-arch images (cubin + PTX, hsaco) + manifest.json, with static checks.

    python backends/kernels/aot.py --archs sm80,sm89,sm90,gfx90a,gfx942 --out DIR [--jobs N] [--only KEY=VALUE ...]

Every image is checked after compiling (no spills beyond the stack bytes its tiles.json entry allows, by default
none; no scratch; shared memory within the arch's limit; matrix-core instructions present); any failure is reported
per image and check, and the run exits 1 without a manifest.
Needs no GPU: Triton compiles for both vendors on a CPU machine.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fwd import STRIDE_UNIT  # noqa: E402
from variants import (  # noqa: E402
    ARCHS,
    DEFAULT_OPTIONAL_FEATURES,
    OPS,
    OPTIONAL_FEATURES,
    WS_FAMILY,
    Variant,
    variants,
)

TRITON_VERSION = "3.6.0"  # pinned by the design; the launch ABI below was checked against it


def _manifest_schema() -> int:
    """python/fa2rt/schema.py's MANIFEST_SCHEMA, read without importing fa2rt (which needs torch and the native
    module): the run time checks the manifest against the same number."""
    spec = importlib.util.spec_from_file_location(
        "_fa2rt_schema", Path(__file__).resolve().parents[2] / "python" / "fa2rt" / "schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MANIFEST_SCHEMA


SCHEMA_VERSION = _manifest_schema()
# Triton 3.6 appends global_scratch and profile_scratch pointers after the user params, on both vendors
# (backends/nvidia/driver.py and backends/amd/driver.py: params.append("&global_scratch"), "&profile_scratch").
SCRATCH_PARAMS = 2
# tt.divisibility 16 on the tensor pointers (16-byte aligned base addresses), as Triton's JIT specializes them. Row
# starts are aligned too because the kernel takes strides in units of 8 elements (fwd.STRIDE_UNIT); without both,
# loads stay scalar, cp.async pipelining is lost and tiles spill. The manifest lists the hinted params per image
# ("divisible16") so the dispatcher can reject a problem that breaks the assumption.
DIVISIBILITY = 16


def kernel_spec(op: str):
    """(Triton kernel, run-time parameter list of a dtype and layout, params not hinted 16-byte aligned, compile-time
    parameters of a tile) of an op."""
    import bwd
    import decode
    import fwd

    return {"fwd": (fwd.attn_fwd, fwd.fwd_params, fwd.UNHINTED_PARAMS, fwd.fwd_constexprs),
            "bwd_dq": (bwd.attn_bwd_dq, bwd.bwd_params, bwd.UNHINTED_PARAMS, bwd.bwd_constexprs),
            "bwd_dkdv": (bwd.attn_bwd_dkdv, bwd.bwd_params, bwd.UNHINTED_PARAMS, bwd.bwd_constexprs),
            "bwd_prep": (bwd.attn_bwd_prep, bwd.aux_params, bwd.AUX_UNHINTED_PARAMS, bwd.aux_constexprs),
            "bwd_convert": (bwd.attn_bwd_convert, bwd.aux_params, bwd.AUX_UNHINTED_PARAMS, bwd.aux_constexprs),
            "decode": (decode.attn_decode, decode.decode_params, decode.UNHINTED_PARAMS, decode.decode_constexprs),
            "decode_combine": (decode.attn_decode_combine, decode.combine_params, decode.COMBINE_UNHINTED_PARAMS,
                               decode.combine_constexprs),
            "append": (decode.attn_append, decode.append_params, decode.APPEND_UNHINTED_PARAMS,
                       decode.append_constexprs)}[op]


def divisible_params(op: str, params: list[tuple[str, str]]) -> list[str]:
    unhinted = kernel_spec(op)[2]
    return [name for name, ty in params if ty.startswith("*") and name not in unhinted]

BINARY_EXT = {"cuda": "cubin", "rocm": "hsaco"}


# ---- static checks: plain functions of numbers, each returns None or "check: measured X, limit Y" ----

def _at_most(check: str, measured: int, limit: int) -> str | None:
    return None if measured <= limit else f"{check}: measured {measured}, limit {limit}"


def _at_least(check: str, measured: int, limit: int) -> str | None:
    return None if measured >= limit else f"{check}: measured {measured}, limit >= {limit}"


def check_stack(stack_bytes: int, max_stack_bytes: int = 0) -> str | None:
    return _at_most("stack_bytes (spills)", stack_bytes, max_stack_bytes)


def check_local(local_bytes: int) -> str | None:
    return _at_most("local_bytes (spills)", local_bytes, 0)


def check_global_scratch(global_scratch_size: int) -> str | None:
    return _at_most("global_scratch_size", global_scratch_size, 0)


def check_profile_scratch(profile_scratch_size: int) -> str | None:
    return _at_most("profile_scratch_size", profile_scratch_size, 0)


def check_scratch(scratch_bytes: int) -> str | None:
    return _at_most("scratch_bytes (private segment)", scratch_bytes, 0)


def check_vgpr_spills(vgpr_spill_count: int) -> str | None:
    return _at_most("vgpr_spill_count", vgpr_spill_count, 0)


def check_shared_memory(shared_bytes: int, max_shared_bytes: int) -> str | None:
    return _at_most("shared_bytes", shared_bytes, max_shared_bytes)


def check_mma(instr: str | None, count: int) -> str | None:
    # None: the op has no matrix product to check (its tiles.json entry says "mma_instr": null).
    return None if instr is None else _at_least(f"{instr} count", count, 1)


def check_dependent_wait(ptx: str, dependent_launch: bool) -> str | None:
    # An image launched as a programmatic dependent must wait for the grid before it, or it reads unfinished results.
    if dependent_launch and "griddepcontrol.wait" not in ptx:
        return "dependent_launch image without griddepcontrol.wait"
    return None


def cuda_checks(res: dict, shared_bytes: int, global_scratch: int, profile_scratch: int,
                max_shared_bytes: int, max_stack_bytes: int = 0, ptx: str = "",
                dependent_launch: bool = False) -> list[str]:
    found = [check_stack(res["stack_bytes"], max_stack_bytes), check_local(res["local_bytes"]),
             check_global_scratch(global_scratch), check_profile_scratch(profile_scratch),
             check_shared_memory(shared_bytes, max_shared_bytes), check_mma(res["mma_instr"], res["mma_count"]),
             check_dependent_wait(ptx, dependent_launch)]
    return [f for f in found if f]


def rocm_checks(res: dict, profile_scratch: int, max_shared_bytes: int,
                mma_instr: str | None = "v_mfma") -> list[str]:
    found = [check_scratch(res["scratch_bytes"]), check_vgpr_spills(res["vgpr_spill_count"]),
             check_profile_scratch(profile_scratch), check_shared_memory(res["lds_bytes"], max_shared_bytes),
             check_mma(mma_instr, res["mfma_count"])]
    return [f for f in found if f]


# ---- parsers of the tools' text output ----

def parse_res_usage(text: str) -> dict:
    """`cuobjdump -res-usage` -> {"registers", "stack_bytes", "local_bytes"} of the (single) kernel function."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", text)
    if not m:
        raise ValueError(f"no REG/STACK/LOCAL line in cuobjdump -res-usage output:\n{text}")
    return {"registers": int(m[1]), "stack_bytes": int(m[2]), "local_bytes": int(m[3])}


def count_sass(sass: str, instr: str) -> int:
    return len(re.findall(rf"\b{instr}\.", sass))


def parse_ptx_target(ptx: str) -> str:
    m = re.search(r"^\s*\.target\s+([\w]+)", ptx, re.MULTILINE)
    if not m:
        raise ValueError("no .target line in PTX")
    return m[1]


def parse_amdgcn(text: str, lds_bytes: int) -> dict:
    """AMDGCN assembly (with its metadata block) -> resource record; lds_bytes is Triton's metadata.shared."""
    def field(key: str, default: int | None = None) -> int | None:
        vals = [int(v) for v in re.findall(rf"^\s*-?\s*\.{key}:\s*(\d+)", text, re.MULTILINE)]
        return max(vals) if vals else default

    scratch = [int(v) for v in re.findall(r"; ScratchSize:\s*(\d+)", text)]
    res = {
        "vgpr_count": field("vgpr_count"),
        "sgpr_count": field("sgpr_count"),
        "scratch_bytes": max([field("private_segment_fixed_size", 0)] + scratch),
        "lds_bytes": max(lds_bytes, field("group_segment_fixed_size", 0)),
        # "SGPR spill to VGPR lane" stays in registers; only VGPR spills go to scratch memory.
        "sgpr_spill_count": field("sgpr_spill_count", 0),
        "vgpr_spill_count": field("vgpr_spill_count", 0),
        "mfma_count": len(re.findall(r"^\s*v_mfma", text, re.MULTILINE)),
    }
    agpr = field("agpr_count")
    if agpr is not None:
        res["agpr_count"] = agpr
    return res


# ---- compile one variant (runs in a worker process) ----

def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tool(name: str) -> Path:
    import triton
    return Path(triton.__file__).parent / "backends/nvidia/bin" / name


def ws_module(op: str):
    """The Gluon source of an op's WS_FAMILY images (compile_for, params, tensor_maps)."""
    import bwd_ws
    import fwd_ws
    return {"fwd": fwd_ws, "bwd_ws": bwd_ws}[op]


# Ops whose WS_FAMILY images take a flat grid of tiles (fwd_ws walks (block, batch, head) itself); bwd_ws has the
# Triton kernels' (key blocks, batch * KV heads) grid.
FLAT_GRID_OPS = ("fwd",)


def compile_ws_variant(v: Variant):
    """A WS_FAMILY image (Gluon): its tensor descriptors and schedule from the tiles.json entry."""
    from triton.backends.compiler import GPUTarget

    tile = v.ws_schedule()
    target = GPUTarget(v.target_backend, v.target_arch, v.warp_size)
    return ws_module(v.op).compile_for(target, v.dtype, v.head_dim, tile), ws_module(v.op).params()


def compile_variant(v: Variant):
    if v.family == WS_FAMILY:
        return compile_ws_variant(v)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, params_of, _, constexprs_of = kernel_spec(v.op)
    params = params_of(v.dtype, v.layout)
    # Options of some ops only: page_aligned (variants.PAGE_ALIGNED_OPS), pdl (variants.PDL_OPS).
    roles = ({"page_aligned": True} if v.page_aligned else {}) | ({"pdl": True} if v.pdl else {})
    constexprs = constexprs_of(v.block_m, v.block_n, v.head_dim, v.d_mask, v.features, v.layout, **roles)
    signature = dict(params) | {k: "constexpr" for k in constexprs}
    hinted = divisible_params(v.op, params)
    attrs = {(i,): [["tt.divisibility", DIVISIBILITY]] for i, (name, _) in enumerate(params) if name in hinted}
    options = {"num_warps": v.num_warps, "num_stages": v.num_stages}
    if v.vendor == "rocm":
        options["waves_per_eu"] = v.waves_per_eu
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget(v.target_backend, v.target_arch, v.warp_size), options=options), params


def build_image(v: Variant, out: Path) -> tuple[dict | None, list[str], float]:
    """Compile, write the image files, measure and check. Returns (manifest row, failures, seconds)."""
    t0 = time.perf_counter()
    try:
        compiled, params = compile_variant(v)
    except Exception as e:  # one broken variant must not hide the others' results
        return None, [f"compile: {type(e).__name__}: {e}"], time.perf_counter() - t0
    md = compiled.metadata
    binary = out / f"{v.name}.{BINARY_EXT[v.vendor]}"
    binary.write_bytes(compiled.asm[BINARY_EXT[v.vendor]])
    ptx = None
    if v.vendor == "cuda":
        ptx_file = out / f"{v.name}.ptx"
        ptx_file.write_text(compiled.asm["ptx"])
        target = parse_ptx_target(compiled.asm["ptx"])
        ptx = {"file": ptx_file.name, "sha256": _sha256_file(ptx_file), "target": target,
               "portable": not target.endswith("a")}

        def cuobjdump(flag):
            return subprocess.run([str(_tool("cuobjdump")), flag, str(binary)], check=True, capture_output=True,
                                  text=True).stdout

        res = parse_res_usage(cuobjdump("-res-usage"))
        res |= {"mma_instr": v.mma_instr,
                "mma_count": count_sass(cuobjdump("-sass"), v.mma_instr) if v.mma_instr else 0}
        failures = cuda_checks(res, md.shared, getattr(md, "global_scratch_size", 0) or 0,
                               getattr(md, "profile_scratch_size", 0) or 0, v.max_shared_bytes, v.max_stack_bytes,
                               compiled.asm["ptx"], v.dependent_launch)
    else:
        res = parse_amdgcn(compiled.asm["amdgcn"], md.shared) | {"waves_per_eu": v.waves_per_eu}
        failures = rocm_checks(res, getattr(md, "profile_scratch_size", 0) or 0, v.max_shared_bytes, v.mma_instr)
    row = {
        "name": v.name, "op": v.op, "vendor": v.vendor, "arch": v.arch, "dtype": v.dtype, "head_dim": v.head_dim,
        "d_mask": v.d_mask, "features": list(v.features), "full_band_only": v.full_band_only,
        "max_seqlen_k": v.max_seqlen_k, "one_split": v.one_split, "dependent_launch": v.dependent_launch,
        "layouts": [v.layout], "page_multiple": v.page_multiple,
        "optional_features": list(OPTIONAL_FEATURES.get(v.op, DEFAULT_OPTIONAL_FEATURES)),
        "block_m": v.block_m, "block_n": v.block_n,
        # Triton's count: a warp-specialised kernel's partitions included (fwd_ws: 3 warpgroups).
        "num_warps": md.num_warps, "num_stages": v.num_stages, "warp_size": v.warp_size,
        "threads": md.num_warps * v.warp_size,
        "shared_bytes": md.shared, "kernel_name": md.name, "params": [list(p) for p in params],
        "scratch_params": SCRATCH_PARAMS, "align16": True,
        "divisible16": [] if v.family == WS_FAMILY else divisible_params(v.op, params),
        "family": v.family, "flat_grid": v.family == WS_FAMILY and v.op in FLAT_GRID_OPS,
        "ctas_per_sm": ctas_per_sm(v),
        "tensor_maps": ws_module(v.op).tensor_maps(md.tensordesc_meta) if v.family == WS_FAMILY else [],
        "stride_unit": STRIDE_UNIT,
        "binary": {"kind": BINARY_EXT[v.vendor], "file": binary.name, "sha256": _sha256_file(binary)},
        "ptx": ptx, "resources": res,
    }
    return row, failures, time.perf_counter() - t0


def ctas_per_sm(v: Variant) -> int:
    """A persistent image's programs per SM (0: one program per tile)."""
    import fwd_ws
    return fwd_ws.ctas_per_sm(v.ws_schedule()) if v.persistent else 0


def _build_star(args):
    return build_image(*args)


# ---- CLI ----

def _select(vs: list[Variant], only: list[str]) -> list[Variant]:
    keys = {"op": "op", "arch": "arch", "dtype": "dtype", "head_dim": "head_dim", "d_mask": "d_mask",
            "features": "feature_tag", "layout": "layout"}
    for item in only:
        key, _, value = item.partition("=")
        if key not in keys or not value:
            raise ValueError(f"--only {item!r}: expected KEY=VALUE with KEY one of {', '.join(keys)}")
        vs = [v for v in vs if str(getattr(v, keys[key])).lower() == value.lower()]
    return vs


def _summary(row: dict) -> str:
    r = row["resources"]
    if row["vendor"] == "cuda":
        regs, mma = f"regs={r['registers']}", f"{r['mma_instr']}={r['mma_count']}"
    else:
        regs, mma = f"vgprs={r['vgpr_count']}", f"v_mfma={r['mfma_count']}"
    return f"{row['name']:<56} shared={row['shared_bytes']:<7} {regs:<10} {mma:<12}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated (default all): {', '.join(ARCHS)}")
    p.add_argument("--out", required=True, type=Path, help="output directory for images and manifest.json")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="build only variants whose KEY (op, arch, dtype, head_dim, d_mask, features, layout) equals "
                        "VALUE, e.g. --only dtype=fp16 --only layout=varlen; repeatable, all must match")
    args = p.parse_args(argv)

    import triton
    if triton.__version__ != TRITON_VERSION:
        print(f"aot: Triton {TRITON_VERSION} required (pinned), found {triton.__version__}", file=sys.stderr)
        return 2
    try:
        vs = _select(variants([a.strip() for a in args.archs.split(",") if a.strip()]), args.only)
    except ValueError as e:
        print(f"aot: {e}", file=sys.stderr)
        return 2
    if not vs:
        print("aot: no variants selected", file=sys.stderr)
        return 2

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Remove what an earlier run left, so the directory holds exactly what the new manifest lists.
    for f in out.iterdir():
        if f.name == "manifest.json" or (f.name.startswith(tuple(f"{op}-" for op in OPS))
                                         and f.suffix in (".cubin", ".ptx", ".hsaco")):
            f.unlink()

    rows, failures = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fa2rt-aot-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: a stale one could hand back old binaries
        work = [(v, out) for v in vs]
        with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else nullcontext() as pool:
            for v, (row, fails, secs) in zip(vs, (pool.map if pool else map)(_build_star, work), strict=True):
                if row is not None:
                    rows.append(row)
                    print(f"{_summary(row)} {secs:5.1f}s" + ("  FAILED" if fails else ""), flush=True)
                else:
                    print(f"{v.name:<56} compile FAILED {secs:5.1f}s", flush=True)
                failures += [f"{v.name}: {f}" for f in fails]
    elapsed = time.perf_counter() - t0

    if failures:
        print(f"aot: {len(failures)} static check failure(s), no manifest written:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    manifest = write_manifest(out, rows)
    print(f"aot: {len(rows)} images for {', '.join(manifest['archs'])} in {elapsed:.1f}s -> {out}")
    return 0


def write_manifest(out: Path, rows: list[dict]) -> dict:
    """manifest.json for these rows, kept in the given order: the dispatcher's preference order."""
    import triton

    manifest = {"schema_version": SCHEMA_VERSION, "triton_version": triton.__version__,
                "archs": sorted({r["arch"] for r in rows}, key=list(ARCHS).index), "images": rows}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


if __name__ == "__main__":
    sys.exit(main())
