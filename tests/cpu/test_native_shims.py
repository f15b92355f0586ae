"""The vendor shims (backends/cuda, backends/rocm) against test doubles of the driver libraries (tests/fakes).

Each scenario runs in a fresh interpreter, since a backend opens its library once per process. The interpreter
loads the fake with ctypes before the shim does; the shim's dlopen(RTLD_NOLOAD) then returns the same handle, so
the log the fake keeps of its calls is the one the test reads back.
"""

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fa2rt import _C

FAKES = Path(__file__).resolve().parents[1] / "fakes"
VENDORS = {
    "cuda": {"env": "CUDA", "library_var": "FA2RT_CUDA_LIBRARY", "source": "fake_cuda.c", "warp": 32,
             "load": "cuModuleLoadDataEx", "launch": "cuLaunchKernel"},
    "rocm": {"env": "HIP", "library_var": "FA2RT_HIP_LIBRARY", "source": "fake_hip.c", "warp": 64,
             "load": "hipModuleLoadData", "launch": "hipModuleLaunchKernel"},
}
both = pytest.mark.parametrize("vendor", sorted(VENDORS))

PARAMS = [("X", "*fp16"), ("n", "i32"), ("s", "i64"), ("scale", "fp32")]
ARGS = {"X": 0x7F00DEAD0000, "n": 130, "s": 1 << 40, "scale": 0.125}
SIZES = [8, 4, 8, 4, 8, 8]  # the four parameters, then two scratch pointers
PACKED = [struct.pack("<Q", ARGS["X"]).hex(), struct.pack("<i", 130).hex(), struct.pack("<q", 1 << 40).hex(),
          struct.pack("<f", 0.125).hex(), "00" * 8, "00" * 8]
STREAM = 0x5EED00
SHARED = 4096
IMAGE = b"FAKE-IMAGE-0123456789\x00\x01\x02tail"

PRELUDE = """
import ctypes, importlib.machinery, importlib.util, json, sys
module_path, lib_path, sizes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
loader = importlib.machinery.ExtensionFileLoader("fa2rt._C", module_path)
spec = importlib.util.spec_from_file_location("fa2rt._C", module_path, loader=loader)
_C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_C)  # the extension alone: importing the package would pull in torch
lib = ctypes.CDLL(lib_path) if lib_path else None
if lib:
    lib.fake_log.restype = ctypes.c_char_p
    lib.fake_set_param_sizes((ctypes.c_int * len(sizes))(*sizes), len(sizes))

def attempt(fn, *args):
    try:
        return {"value": fn(*args)}
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)}

def device(vendor, index):
    d = _C.probe_device(vendor, index)
    keys = ("vendor", "index", "arch", "arch_raw", "name", "warp_size", "shared_optin_bytes", "multiprocessors")
    return {k: getattr(d, k) for k in keys}

def registry(spec):
    img = _C.ImageInfo()
    for key, value in spec.items():
        if key in ("binary", "ptx"):
            f = _C.ImageFile()
            f.path, f.sha256 = value
            value = f
        setattr(img, key, value)
    reg = _C.Registry()
    reg.add(img)
    return reg

def problem(seqlen_q=130):
    p = _C.Problem()
    p.op, p.seqlen_q, p.batch, p.nheads = "fwd", seqlen_q, 2, 3
    return p

def launch(reg, mode="native", device=0, args=None):
    return attempt(_C.launch, reg, "fwd-test", mode, device, STREAM, problem(), args or ARGS)
"""

EPILOGUE = """
calls = [json.loads(line) for line in lib.fake_log().decode().splitlines()] if lib else []
print(json.dumps({"out": out, "calls": calls}))
"""


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """fake(vendor, *cc_flags) -> path of the compiled test double."""
    cc = shutil.which("cc") or pytest.skip("no C compiler")
    out, built = tmp_path_factory.mktemp("fakes"), {}

    def build(vendor, *flags):
        if (vendor, flags) not in built:
            lib = out / f"libfake_{vendor}{''.join(f.lower() for f in flags)}.so"
            subprocess.run([cc, "-shared", "-fPIC", *flags, "-o", str(lib), str(FAKES / VENDORS[vendor]["source"])],
                           check=True)
            built[vendor, flags] = lib
        return built[vendor, flags]

    return build


def run(vendor, lib, body, override=True, env=(), sizes=SIZES, **fake_env):
    """Runs `body` (which sets `out`) in a fresh interpreter with the shim pointed at `lib` (unless not `override`)
    and `lib` loaded through ctypes first; returns out and the calls the fake saw (launch params split by
    `sizes`)."""
    v = VENDORS[vendor]
    env = {**{k: val for k, val in os.environ.items() if not k.startswith(("FAKE_", "FA2RT_"))}, **dict(env)}
    if override:
        env[v["library_var"]] = str(lib)
    env.update({f"FAKE_{v['env']}_{k}": str(val) for k, val in fake_env.items()})
    lib_arg = str(lib) if Path(lib).exists() else ""
    proc = subprocess.run(
        [sys.executable, "-c", f"STREAM, ARGS = {STREAM}, {ARGS!r}\n" + PRELUDE + textwrap.dedent(body) + EPILOGUE,
         _C.__file__, lib_arg, json.dumps(sizes)],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def image_spec(tmp_path, vendor, data=IMAGE, sha=None, **extra):
    binary = tmp_path / "kernel.bin"
    binary.write_bytes(data)
    spec = {"name": "fwd-test", "op": "fwd", "vendor": vendor, "arch": "sm90" if vendor == "cuda" else "gfx942",
            "dtype": "fp16", "head_dim": 64, "block_m": 64, "block_n": 32, "num_warps": 4,
            "warp_size": VENDORS[vendor]["warp"], "shared_bytes": SHARED, "kernel_name": "attn_fwd",
            "params": PARAMS, "scratch_params": 2,
            "binary": [str(binary), sha or hashlib.sha256(data).hexdigest()]}
    return {**spec, **extra}


def named(calls, *names):
    return [c for c in calls if c["call"] in names]


# --- opening the library -------------------------------------------------------------------------------------------

@both
def test_library_missing_is_a_status_and_probe_says_why(vendor, tmp_path):
    missing = tmp_path / "no-such-driver.so"
    r = run(vendor, missing, f"out = [_C.backend_status({vendor!r}), attempt(device, {vendor!r}, 0)]")
    status, probe = r["out"]
    assert status["available"] is False and status["device_count"] == 0
    assert str(missing) in status["error"]
    assert probe["error"] == "RuntimeError"
    assert "backend unavailable" in probe["message"] and str(missing) in probe["message"]


@both
def test_missing_symbol_is_a_status(vendor, fake):
    r = run(vendor, fake(vendor, "-DFAKE_OMIT_LAUNCH"), f"out = _C.backend_status({vendor!r})")
    assert r["out"]["available"] is False
    assert r["out"]["error"].endswith("lacks " + VENDORS[vendor]["launch"])
    assert r["calls"] == []  # nothing called before every symbol is bound


@pytest.mark.parametrize("vendor, expected", [
    ("cuda", "CUDA driver: cuInit failed with CUDA_ERROR_NO_DEVICE (100)"),
    ("rocm", "HIP runtime: hipInit failed with hipErrorNoDevice (100)"),
])
def test_init_failure_names_call_and_code(vendor, expected, fake):
    call = "cuInit" if vendor == "cuda" else "hipInit"
    r = run(vendor, fake(vendor), f"out = [_C.backend_status({vendor!r}), attempt(device, {vendor!r}, 0)]",
            FAIL=f"{call}:100")
    status, probe = r["out"]
    assert status["available"] is False and status["error"] == expected
    assert probe["error"] == "RuntimeError" and expected in probe["message"]


def test_hip_prefers_a_runtime_already_loaded_under_any_of_its_names(fake, tmp_path):
    # torch's copy, loaded by path under a versioned soname, must win over an unversioned one found on the path.
    loaded = fake("rocm", "-Wl,-soname,libamdhip64.so.6")
    (tmp_path / "libamdhip64.so").symlink_to(fake("rocm", "-DFAKE_OMIT_LAUNCH"))
    r = run("rocm", loaded, "out = _C.backend_status('rocm')", override=False, env={"LD_LIBRARY_PATH": str(tmp_path)})
    assert r["out"]["available"] is True and r["out"]["library"] == "libamdhip64.so.6"
    assert named(r["calls"], "hipInit") != []


# --- probing ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cc, arch, raw", [("90", "sm90", "9.0"), ("86", "sm86", "8.6"), ("120", "sm120", "12.0")])
def test_cuda_probe(cc, arch, raw, fake):
    r = run("cuda", fake("cuda"), "out = [_C.backend_status('cuda'), device('cuda', 1)]", DEVICES=2, CC=cc,
            SMS=132, SHARED_OPTIN=232448, NAME="Fake H100")
    status, info = r["out"]
    assert status == {"available": True, "library": str(fake("cuda")), "error": "", "driver_version": 12080,
                      "device_count": 2}
    assert info == {"vendor": "cuda", "index": 1, "arch": arch, "arch_raw": raw, "name": "Fake H100", "warp_size": 32,
                    "shared_optin_bytes": 232448, "multiprocessors": 132}


@pytest.mark.parametrize("flags", [(), ("-DFAKE_ROCM5",)], ids=["rocm6-props", "rocm5-props"])
@pytest.mark.parametrize("raw, arch", [("gfx942:sramecc+:xnack-", "gfx942"), ("gfx90a", "gfx90a")])
def test_rocm_probe(raw, arch, flags, fake):
    r = run("rocm", fake("rocm", *flags), "out = [_C.backend_status('rocm'), device('rocm', 1)]", DEVICES=2, ARCH=raw,
            CUS=304, LDS=65536, NAME="Fake MI300X")
    status, info = r["out"]
    assert status["available"] is True and status["device_count"] == 2 and status["driver_version"] == 60342134
    assert info == {"vendor": "rocm", "index": 1, "arch": arch, "arch_raw": raw, "name": "Fake MI300X", "warp_size": 64,
                    "shared_optin_bytes": 65536, "multiprocessors": 304}
    attrs = {c["attr"] for c in named(r["calls"], "hipDeviceGetAttribute")}
    assert attrs == {63, 74, 87}  # MultiprocessorCount, MaxSharedMemoryPerBlock, WarpSize (ROCm >= 5 numbering)


@both
def test_device_index_out_of_range(vendor, fake, tmp_path):
    spec = image_spec(tmp_path, vendor)
    r = run(vendor, fake(vendor), f"""
        out = [attempt(device, {vendor!r}, 2), attempt(device, {vendor!r}, -1), launch(registry({spec!r}), device=5)]
        """, DEVICES=2)
    for result, index in zip(r["out"], (2, -1, 5), strict=True):
        assert result["error"] == "IndexError"
        assert f"device index {index} out of range [0, 2)" in result["message"]
    assert named(r["calls"], VENDORS[vendor]["load"], VENDORS[vendor]["launch"]) == []


# --- loading and launching -----------------------------------------------------------------------------------------

@both
def test_launch_end_to_end_and_module_cache(vendor, fake, tmp_path):
    v = VENDORS[vendor]
    spec = image_spec(tmp_path, vendor)
    r = run(vendor, fake(vendor), f"""
        reg = registry({spec!r})
        out = [launch(reg), launch(reg), _C.cached_kernel_count()]
        """)
    assert r["out"] == [{"value": None}, {"value": None}, 1]
    (load,) = named(r["calls"], v["load"])
    assert load["head"] == IMAGE[:16].hex() and load["strlen"] == IMAGE.index(b"\0")
    (get,) = named(r["calls"], "cuModuleGetFunction", "hipModuleGetFunction")
    assert get["name"] == "attn_fwd"
    launches = named(r["calls"], v["launch"])
    assert len(launches) == 2 and launches[0]["function"] == launches[1]["function"]
    for call in launches:
        assert call["grid"] == [3, 6, 1]  # ceil(130 / 64) query blocks, batch * nheads
        assert call["block"] == [4 * v["warp"], 1, 1]
        assert call["shared"] == SHARED and call["stream"] == STREAM and call["extra"] == 0
        assert call["params"] == PACKED
    assert named(r["calls"], "cuFuncSetAttribute") == []  # 4 KB needs no opt-in


@pytest.mark.parametrize("flags, launched", [((), "cuLaunchKernelEx"), (("-DFAKE_OMIT_LAUNCH_EX",), "cuLaunchKernel")])
def test_cuda_dependent_image_launches_as_a_programmatic_dependent(flags, launched, fake, tmp_path):
    # A dependent_launch image goes through cuLaunchKernelEx with programmatic stream serialization (attribute 6,
    # value 1) and everything cuLaunchKernel would get; a driver without cuLaunchKernelEx launches it plainly (its
    # own griddepcontrol.wait then does nothing). A plain image never uses the attribute.
    spec = image_spec(tmp_path, "cuda", dependent_launch=True)
    plain = image_spec(tmp_path, "cuda")
    r = run("cuda", fake("cuda", *flags), f"out = [launch(registry({spec!r})), launch(registry({plain!r}))]")
    assert r["out"] == [{"value": None}] * 2
    first, second = named(r["calls"], "cuLaunchKernelEx", "cuLaunchKernel")
    assert (first["call"], second["call"]) == (launched, "cuLaunchKernel")
    for call in (first, second):
        assert call["grid"] == [3, 6, 1] and call["block"] == [128, 1, 1]
        assert call["shared"] == SHARED and call["stream"] == STREAM and call["extra"] == 0
        assert call["params"] == PACKED and call["ctx"] == 0xC0000
    if launched == "cuLaunchKernelEx":
        assert first["attrs"] == [[6, 1]]


def test_cuda_large_shared_memory_opts_in(fake, tmp_path):
    spec = image_spec(tmp_path, "cuda", shared_bytes=100_000)
    r = run("cuda", fake("cuda"), f"out = launch(registry({spec!r}))", SHARED_OPTIN=232448, STATIC_SHARED=1024)
    assert r["out"] == {"value": None}
    (get,) = named(r["calls"], "cuFuncGetAttribute")
    (set_,) = named(r["calls"], "cuFuncSetAttribute")
    assert get["attr"] == 1 and set_["attr"] == 8 and set_["value"] == 232448 - 1024
    assert named(r["calls"], "cuLaunchKernel")[0]["shared"] == 100_000


@pytest.mark.parametrize("current, target, pushes", [(None, 0, True), (0, 0, False), (0, 1, True)])
def test_cuda_context_push_pop_pairing(current, target, pushes, fake, tmp_path):
    spec = image_spec(tmp_path, "cuda")
    env = {"DEVICES": 2} if current is None else {"DEVICES": 2, "CURRENT": current}
    r = run("cuda", fake("cuda"), f"reg = registry({spec!r}); out = [launch(reg, device={target}) for _ in range(2)]",
            **env)
    assert r["out"] == [{"value": None}] * 2
    short = {"cuCtxPushCurrent_v2": "push", "cuCtxPopCurrent_v2": "pop", "cuModuleLoadDataEx": "load",
             "cuLaunchKernel": "launch"}
    calls = named(r["calls"], *short)
    expected = ["load", "launch", "launch"]
    if pushes:  # each inside its own push/pop
        expected = [step for call in expected for step in ("push", call, "pop")]
    assert [short[c["call"]] for c in calls] == expected
    assert all(c["ctx"] == 0xC0000 + target for c in calls)  # the fake's primary context of `target`


def test_cuda_context_popped_after_failed_launch(fake, tmp_path):
    spec = image_spec(tmp_path, "cuda")
    r = run("cuda", fake("cuda"), f"out = launch(registry({spec!r}))", FAIL="cuLaunchKernel:719")
    assert r["out"]["error"] == "RuntimeError"
    assert r["out"]["message"] == "CUDA driver: cuLaunchKernel failed with CUDA_ERROR_LAUNCH_FAILED (719)"
    assert len(named(r["calls"], "cuCtxPushCurrent_v2")) == len(named(r["calls"], "cuCtxPopCurrent_v2")) == 2


@pytest.mark.parametrize("current, target, switches", [(0, 1, True), (1, 1, False)])
def test_hip_sets_and_restores_device(current, target, switches, fake, tmp_path):
    spec = image_spec(tmp_path, "rocm")
    r = run("rocm", fake("rocm"), f"reg = registry({spec!r}); out = [launch(reg, device={target}) for _ in range(2)]",
            DEVICES=2, CURRENT=current)
    assert r["out"] == [{"value": None}] * 2
    sets = [c["device"] for c in named(r["calls"], "hipSetDevice")]
    assert sets == ([target, current] * 3 if switches else [])  # around the load and each launch
    assert all(c["device"] == target for c in named(r["calls"], "hipModuleLoadData", "hipModuleLaunchKernel"))


def test_hip_device_restored_after_failed_launch(fake, tmp_path):
    spec = image_spec(tmp_path, "rocm")
    r = run("rocm", fake("rocm"), f"out = launch(registry({spec!r}), device=1)", DEVICES=2, CURRENT=0,
            FAIL="hipModuleLaunchKernel:719")
    assert r["out"]["message"] == "HIP runtime: hipModuleLaunchKernel failed with hipErrorLaunchFailure (719)"
    assert [c["device"] for c in named(r["calls"], "hipSetDevice")] == [1, 0, 1, 0]


@both
def test_sha256_mismatch_raises_before_loading(vendor, fake, tmp_path):
    spec = image_spec(tmp_path, vendor, sha="0" * 64)
    r = run(vendor, fake(vendor), f"out = [launch(registry({spec!r})), _C.cached_kernel_count()]")
    result, cached = r["out"]
    assert result["error"] == "RuntimeError" and "kernel image corrupt: sha256 of" in result["message"]
    assert cached == 0
    assert named(r["calls"], VENDORS[vendor]["load"], VENDORS[vendor]["launch"]) == []


@pytest.mark.parametrize("vendor, expected", [
    ("cuda", "CUDA driver: cuModuleLoadDataEx failed with CUDA_ERROR_INVALID_PTX (218): "
             "ptxas fatal : Unresolved extern function 'boom'"),
    ("rocm", "HIP runtime: hipModuleLoadData failed with hipErrorInvalidImage (200)"),
])
def test_module_load_failure_is_reported_and_not_cached(vendor, expected, fake, tmp_path):
    spec = image_spec(tmp_path, vendor)
    body = f"reg = registry({spec!r}); out = [launch(reg), launch(reg), _C.cached_kernel_count()]"
    r = run(vendor, fake(vendor), body, BAD_IMAGE="FAKE-IMAGE",
            JIT_LOG="ptxas fatal : Unresolved extern function 'boom'")
    first, second, cached = r["out"]
    assert first == second == {"error": "RuntimeError", "message": expected}
    assert cached == 0 and len(named(r["calls"], VENDORS[vendor]["load"])) == 2


@both
def test_kernel_argument_errors_name_the_argument(vendor, fake, tmp_path):
    spec = image_spec(tmp_path, vendor)
    cases = [{k: v for k, v in ARGS.items() if k != "n"}, {**ARGS, "bogus": 1}, {**ARGS, "n": 2**31},
             {**ARGS, "n": True}, {**ARGS, "X": 1.5}]
    r = run(vendor, fake(vendor), f"reg = registry({spec!r}); out = [launch(reg, args=a) for a in {cases!r}]")
    expected = [("ValueError", "kernel argument n of fwd-test missing"),
                ("ValueError", "kernel argument bogus is not a parameter of fwd-test"),
                ("IndexError", "kernel argument n: expected a value in int32 range, got 2147483648"),
                ("ValueError", "kernel argument n: expected an int or float"),
                ("ValueError", "kernel argument X: expected an integer for type *fp16")]
    assert [(o["error"], o["message"]) for o in r["out"]] == expected
    assert named(r["calls"], VENDORS[vendor]["load"], VENDORS[vendor]["launch"]) == []


@both
def test_launch_plan_passes_what_launch_passes_with_each_calls_addresses(vendor, fake, tmp_path):
    v = VENDORS[vendor]
    spec = image_spec(tmp_path, vendor)
    constants = {k: val for k, val in ARGS.items() if k != "X"}
    r = run(vendor, fake(vendor), f"""
        reg = registry({spec!r})
        plan = _C.LaunchPlan(reg, "fwd-test", "native", problem(), {constants!r}, ["X"])
        same = plan.packed([{ARGS["X"]}]) == _C.pack_params(reg, "fwd-test", ARGS)
        out = [same, plan.image, plan.mode, plan.pointers, plan.grid, plan.block, plan.shared_bytes,
               attempt(plan.launch, 0, STREAM, [{ARGS["X"]}]), attempt(plan.launch, 0, STREAM, [0x1234560]),
               _C.cached_kernel_count()]
        """)
    assert r["out"] == [True, "fwd-test", "native", ["X"], [3, 6, 1], 4 * v["warp"], SHARED, {"value": None},
                        {"value": None}, 1]
    first, second = named(r["calls"], v["launch"])
    assert first["params"] == PACKED and second["params"] == [struct.pack("<Q", 0x1234560).hex()] + PACKED[1:]
    for call in (first, second):
        assert call["grid"] == [3, 6, 1] and call["stream"] == STREAM and call["shared"] == SHARED


@both
def test_launch_plan_argument_errors_name_the_argument(vendor, fake, tmp_path):
    spec = image_spec(tmp_path, vendor)
    constants = {k: val for k, val in ARGS.items() if k != "X"}
    cases = [({k: val for k, val in constants.items() if k != "n"}, ["X"]), ({**constants, "bogus": 1}, ["X"]),
             ({**constants, "n": 2**31}, ["X"]), (ARGS, ["X"]), (constants, ["X", "Y"]),
             ({k: val for k, val in ARGS.items() if k != "n"}, ["n"])]
    r = run(vendor, fake(vendor), f"""
        reg = registry({spec!r})
        out = [attempt(_C.LaunchPlan, reg, "fwd-test", "native", problem(), a, p) for a, p in {cases!r}]
        plan = _C.LaunchPlan(reg, "fwd-test", "native", problem(), {constants!r}, ["X"])
        out += [attempt(plan.launch, 0, STREAM, []), attempt(plan.launch, 0, STREAM, [1, 2])]
        empty = _C.LaunchPlan(reg, "fwd-test", "native", problem(seqlen_q=0), {constants!r}, ["X"])
        out += [attempt(empty.launch, 0, STREAM, [1])]
        """)
    expected = [("ValueError", "kernel argument n of fwd-test missing"),
                ("ValueError", "kernel argument bogus is not a parameter of fwd-test"),
                ("IndexError", "kernel argument n: expected a value in int32 range, got 2147483648"),
                ("ValueError", "kernel argument X of fwd-test given twice"),
                ("ValueError", "kernel argument Y is not a parameter of fwd-test"),
                ("ValueError", "kernel argument n of fwd-test: expected a pointer parameter, got type i32"),
                ("ValueError", "launch plan of fwd-test: expected 1 addresses (X), got 0"),
                ("ValueError", "launch plan of fwd-test: expected 1 addresses (X), got 2")]
    assert [(o["error"], o["message"]) for o in r["out"][:-1]] == expected
    assert r["out"][-1] == {"value": None}  # an empty grid launches nothing
    assert named(r["calls"], VENDORS[vendor]["load"], VENDORS[vendor]["launch"]) == []


# A Gluon image's TMA descriptor param: T over a (3, 100, 128) tensor, 64 x 64 boxes, then n; a tile-walk grid.
MAP_PARAMS = ([("T", "tensormap")] + [(f"T.shape{i}", "i32") for i in range(3)]
              + [(f"T.stride{i}", "i64") for i in range(3)] + [("n", "i32")])
MAP_ARGS = {"T.shape0": 3, "T.shape1": 100, "T.shape2": 128, "T.stride0": 100 * 256, "T.stride1": 256,
            "T.stride2": 1, "n": 7}
MAP_SIZES = [128] + [4] * 3 + [8] * 3 + [4, 8, 8]
MAP_BODY = """
        spec = {spec!r}
        m = _C.TensorMap()
        m.param, m.dtype, m.elem_size, m.swizzle, m.box = "T", 9, 2, 3, [1, 64, 64]
        img_maps = [m] if {with_map!r} else []
        reg = registry(dict(spec, tensor_maps=img_maps))
        """


def map_spec(tmp_path, vendor, params=MAP_PARAMS):
    return image_spec(tmp_path, vendor, params=params, flat_grid=True)


def test_cuda_tensor_map_encoded_for_each_new_address(fake, tmp_path):
    """A map is encoded from the launch's address, once per address (the plan fixes everything else it encodes)."""
    spec = map_spec(tmp_path, "cuda")
    addresses = [0x7f0000001000, 0x7f0000001000, 0x7f0000002000, 0x7f0000001000, 0x7f0000002000]
    r = run("cuda", fake("cuda"), MAP_BODY.format(spec=spec, with_map=True) + f"""
        plan = _C.LaunchPlan(reg, "fwd-test", "native", problem(), {MAP_ARGS!r}, ["T"])
        out = [plan.grid] + [attempt(plan.launch, 0, STREAM, [a]) for a in {addresses!r}]
        """, sizes=MAP_SIZES)
    assert r["out"][0] == [18, 1, 1]  # ceil(130 / 64) query blocks x batch 2 x nheads 3, along x
    assert r["out"][1:] == [{"value": None}] * 5
    encodes = named(r["calls"], "cuTensorMapEncodeTiled")
    assert [e["address"] for e in encodes] == [0x7f0000001000, 0x7f0000002000]
    for e in encodes:
        # Innermost dim first: (dim, byte stride of the next dim, box, element stride); the outermost has no stride.
        assert e["dims_strides_box_estrides"] == [[128, 512, 64, 1], [100, 51200, 64, 1], [3, 0, 1, 1]]
        assert (e["aligned64"], e["dtype"], e["swizzle"], e["interleave"], e["l2"], e["oob"]) == (1, 9, 3, 0, 2, 0)
    for launch_call, address in zip(named(r["calls"], "cuLaunchKernel"), addresses, strict=True):
        params = launch_call["params"]
        assert params[0] == struct.pack("<Q", address).hex() + "ab" * 120  # the encoded map, by value
        assert params[1:8] == [struct.pack("<i", 3).hex(), struct.pack("<i", 100).hex(), struct.pack("<i", 128).hex(),
                               struct.pack("<q", 25600).hex(), struct.pack("<q", 256).hex(),
                               struct.pack("<q", 1).hex(), struct.pack("<i", 7).hex()]
        assert launch_call["grid"] == [18, 1, 1]


def test_cuda_tensor_maps_kept_are_bounded_and_stay_right(fake, tmp_path):
    """More addresses than the plan keeps maps for: the kept maps are dropped, every launch still passes its own."""
    addresses = [0x7f0000000000 + 0x1000 * i for i in range(600)] + [0x7f0000000000]
    r = run("cuda", fake("cuda"), MAP_BODY.format(spec=map_spec(tmp_path, "cuda"), with_map=True) + f"""
        plan = _C.LaunchPlan(reg, "fwd-test", "native", problem(), {MAP_ARGS!r}, ["T"])
        out = [plan.launch(0, STREAM, [a]) for a in {addresses!r}]
        """, sizes=MAP_SIZES)
    assert len(named(r["calls"], "cuTensorMapEncodeTiled")) == 601  # the first address was dropped at the 513th
    launched = [call["params"][0][:16] for call in named(r["calls"], "cuLaunchKernel")]
    assert launched == [struct.pack("<Q", a).hex() for a in addresses]


def test_tensor_map_errors_name_the_map(fake, tmp_path):
    bad_order = MAP_PARAMS[:4] + MAP_PARAMS[5:] + MAP_PARAMS[4:5]  # a stride where a shape should be
    plan = f'_C.LaunchPlan(reg, "fwd-test", "native", problem(), {MAP_ARGS!r}, ["T"])'
    cases = {"no entry": (map_spec(tmp_path, "cuda"), False, {}), "order": (map_spec(tmp_path, "cuda", bad_order),
                                                                           True, {}),
             "driver": (map_spec(tmp_path, "cuda"), True, {"FAIL": "cuTensorMapEncodeTiled:1"})}
    out = {}
    for case, (spec, with_map, env) in cases.items():
        r = run("cuda", fake("cuda"), MAP_BODY.format(spec=spec, with_map=with_map) + f"""
        made = attempt(lambda: {plan})
        out = made if "error" in made else attempt({plan}.launch, 0, STREAM, [0x7f0000001000])
        """, sizes=MAP_SIZES, **env)
        out[case] = (r["out"]["error"], r["out"]["message"])
        assert named(r["calls"], "cuLaunchKernel") == []
    assert out["no entry"] == ("ValueError", "image fwd-test: tensor map T has no tensor_maps entry")
    assert out["order"] == ("ValueError", "image fwd-test: tensor map T: expected 3 i32 shape and 3 i64 stride "
                                          "params after it")
    assert out["driver"][0] == "ValueError" and out["driver"][1].startswith(
        "CUDA driver: cuTensorMapEncodeTiled failed with unknown (1) for tensor map T (shape@stride 3@25600, "
        "100@256, 128@1")


def test_tensor_maps_need_a_driver_that_encodes_them(fake, tmp_path):
    """A driver without cuTensorMapEncodeTiled still runs every other image; ROCm has no tensor maps."""
    plan = f'_C.LaunchPlan(reg, "fwd-test", "native", problem(), {MAP_ARGS!r}, ["T"])'
    out = {}
    for vendor, flags in (("cuda", ("-DFAKE_OMIT_TENSOR_MAP",)), ("rocm", ())):
        r = run(vendor, fake(vendor, *flags), MAP_BODY.format(spec=map_spec(tmp_path, vendor), with_map=True)
                + f"out = [_C.backend_status('{vendor}')['available'], attempt({plan}.launch, 0, STREAM, [4096])]",
                sizes=MAP_SIZES)
        out[vendor] = r["out"]
    assert out["cuda"][0] and out["cuda"][1]["message"].endswith("lacks cuTensorMapEncodeTiled")
    assert out["rocm"][0] and out["rocm"][1]["message"] == (
        "tensor map T: TMA descriptors are a CUDA feature, the rocm backend has none")


@pytest.mark.parametrize("ctas_per_sm, multiprocessors, programs", [(0, 4, 18), (1, 0, 18), (1, 4, 4), (2, 4, 8),
                                                                    (1, 132, 18)])
def test_persistent_image_launches_per_sm(ctas_per_sm, multiprocessors, programs, tmp_path):
    """A flat grid has a program per tile (18 here); a persistent image's fills the device and walks the tiles.
    With the SM count unknown (0) it still launches every tile, which is as correct."""
    img = _C.ImageInfo()
    img.name, img.op, img.block_m, img.num_warps, img.warp_size = "fwd-test", "fwd", 64, 12, 32
    img.flat_grid, img.ctas_per_sm = True, ctas_per_sm
    p = _C.Problem()
    p.op, p.seqlen_q, p.batch, p.nheads, p.multiprocessors = "fwd", 130, 2, 3, multiprocessors
    reg = _C.Registry()
    reg.add(img)
    assert _C.launch_config(reg, "fwd-test", p)[0] == (programs, 1, 1)


def test_cuda_ptx_mode_loads_nul_terminated_ptx(fake, tmp_path):
    ptx = b"//\n.version 8.7\n.target sm_90\n.address_size 64\n"
    (tmp_path / "kernel.ptx").write_bytes(ptx)
    spec = image_spec(tmp_path, "cuda", has_ptx=True,
                      ptx=[str(tmp_path / "kernel.ptx"), hashlib.sha256(ptx).hexdigest()])
    r = run("cuda", fake("cuda"), f"out = [launch(registry({spec!r}), mode='ptx-jit'), _C.cached_kernel_count()]")
    assert r["out"] == [{"value": None}, 1]
    (load,) = named(r["calls"], "cuModuleLoadDataEx")
    assert load["head"] == ptx[:16].hex() and load["strlen"] == len(ptx)


# --- linkage ---------------------------------------------------------------------------------------------------------

def test_native_module_links_no_gpu_runtime_or_torch():
    readelf = shutil.which("readelf") or pytest.skip("readelf not installed")
    dynamic = subprocess.run([readelf, "-d", _C.__file__], check=True, capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
    assert needed, dynamic
    forbidden = [n for n in needed if re.match(r"lib(cuda|cudart|nvrtc|amdhip64|hiprtc|torch|c10)", n)]
    assert forbidden == []
    system = r"(libc|libstdc\+\+|libgcc_s|libm|libdl|libpthread|ld-linux[-\w]*)\.so"
    assert all(re.match(system, n) for n in needed), needed
