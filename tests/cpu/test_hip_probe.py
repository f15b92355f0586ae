"""The doctor's ROCm probe through hip-python: its states, arch normalisation, version decoding, matching builds,
and what the doctor makes of it (JSON section, text, --require rocm).

Most tests inject a stand-in `hip` package through sys.modules, shaped like the real one (see fa2rt/hip_probe.py's
docstring for what was observed): calls return tuples led by a hipError_t IntEnum, and a missing libamdhip64 makes
every call raise RuntimeError. The tests marked `real` use hip-python itself (pinned in tox's cpu env): with no HIP
runtime on this machine, and against the HIP test double tests/fakes/fake_hip.c.
"""

import enum
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from fa2rt import _C, doctor, hip_probe

DLOPEN_ERROR = ("failed to dlopen 'b'libamdhip64.so'': b'libamdhip64.so: cannot open shared object file: No such file "
                "or directory'")
INSTALLED = {"sm90": 8, "gfx90a": 8, "gfx942": 8}
FAKE_HIP = Path(__file__).resolve().parents[1] / "fakes" / "fake_hip.c"
hip_python = pytest.mark.skipif(importlib.util.find_spec("hip") is None, reason="hip-python is not installed")


class hipError_t(enum.IntEnum):  # noqa: N801 - the binding's name
    hipSuccess = 0
    hipErrorInsufficientDriver = 35
    hipErrorNoDevice = 100
    hipErrorInvalidDevice = 101


def fake_hip(devices=(), runtime=60342134, driver=60342134, no_library=False, fail=(), legacy=False):
    """A `hip` package like hip-python's. devices: (name, gcnArchName) per device; fail: {call: hipError_t};
    legacy: the 7.x hipGetDeviceProperties(props, index) -> (err,) with bytes fields instead of the 10.x
    hipGetDeviceProperties(index) -> (err, props) with str fields."""
    fail = dict(fail)
    calls = []

    def call(name, *outputs):
        calls.append(name)
        if no_library:
            raise RuntimeError(DLOPEN_ERROR)
        return (fail.get(name, hipError_t.hipSuccess), *outputs)

    class hipDeviceProp_t:  # noqa: N801
        name = b"" if legacy else ""
        gcnArchName = b"" if legacy else ""

    def props_of(index):
        props = hipDeviceProp_t()
        if 0 <= index < len(devices):
            name, arch = devices[index]
            props.name, props.gcnArchName = (name.encode(), arch.encode()) if legacy else (name, arch)
        return props

    def get_properties(*args):
        if legacy:
            if len(args) != 2:
                raise TypeError(f"hipGetDeviceProperties() takes exactly 2 positional arguments ({len(args)} given)")
            props, index = args
            filled = props_of(index)
            props.name, props.gcnArchName = filled.name, filled.gcnArchName
            outputs = ()
        else:
            (index,) = args
            outputs = (props_of(index),)
        err, *outputs = call("hipGetDeviceProperties", *outputs)
        return (err if 0 <= index < len(devices) else hipError_t.hipErrorInvalidDevice, *outputs)

    def device_count():
        err, n = call("hipGetDeviceCount", len(devices))
        return (hipError_t.hipErrorNoDevice, 0) if not devices and not err else (err, n)

    hip = types.ModuleType("hip.hip")
    hip.hipError_t = hipError_t
    hip.hipDeviceProp_t = hipDeviceProp_t
    hip.hipRuntimeGetVersion = lambda: call("hipRuntimeGetVersion", runtime)
    hip.hipDriverGetVersion = lambda: call("hipDriverGetVersion", driver)
    hip.hipInit = lambda flags: call("hipInit")
    hip.hipGetDeviceCount = device_count
    hip.hipGetDeviceProperties = get_properties
    pkg = types.ModuleType("hip")
    pkg.hip, pkg.calls = hip, calls
    pkg.__version__ = "7.2.2.562.43" if legacy else "10.0.0.0.1.2"
    pkg.HIP_VERSION_NAME = "7.15.26333-0000000"
    return pkg


@pytest.fixture
def use_hip(monkeypatch):
    """use_hip(package or None): what `import hip` gives the probe (None: the import fails)."""
    def install(pkg):
        monkeypatch.setitem(sys.modules, "hip", pkg)
        monkeypatch.delitem(sys.modules, "hip.hip", raising=False)
        return pkg
    return install


@pytest.mark.parametrize("raw, text", [(60342134, "6.3.42134"), (60443484, "6.4.43484"), (70226015, "7.2.26015"),
                                       (50731921, "5.7.31921"), (0, "0.0.0")])
def test_decode_hip_version(raw, text):
    v = hip_probe.decode_hip_version(raw)
    assert v["text"] == text and v["raw"] == raw
    assert v["major"] * 10_000_000 + v["minor"] * 100_000 + v["patch"] == raw


@hip_python
def test_decode_matches_hip_pythons_own_version_constants():
    """hip-python ships the HIP version it was generated against both encoded and spelled out."""
    import hip

    assert hip_probe.decode_hip_version(hip.HIP_VERSION)["text"] == hip.HIP_VERSION_NAME.split("-")[0]


@pytest.mark.parametrize("raw, arch", [("gfx942:sramecc+:xnack-", "gfx942"), ("gfx90a:sramecc-:xnack+", "gfx90a"),
                                       ("gfx90a", "gfx90a"), ("gfx1100", "gfx1100"), ("", "")])
def test_normalize_arch(raw, arch):
    assert hip_probe.normalize_arch(raw) == arch


def test_matching_builds_follow_the_native_compat_table():
    compat = _C.arch_compat_table()
    assert hip_probe.matching_builds("gfx942", INSTALLED, compat) == [{"arch": "gfx942", "mode": "native",
                                                                        "images": 8}]
    assert hip_probe.matching_builds("gfx942", {"gfx90a": 8}, compat) == []
    assert hip_probe.matching_builds("gfx1100", INSTALLED, compat) == []


def test_not_installed(use_hip):
    use_hip(None)
    r = hip_probe.probe(INSTALLED, _C.arch_compat_table())
    assert r["state"] == hip_probe.STATE_NOT_INSTALLED
    assert r["summary"].startswith("hip-python not installed") and "ModuleNotFoundError" in r["error"]
    assert r["hip_python"] is None and r["runtime_version"] is None and r["devices"] == []


def test_not_importable_is_reported_as_such(use_hip):
    use_hip(types.ModuleType("hip"))  # a module named hip that is not hip-python
    r = hip_probe.probe()
    assert r["state"] == hip_probe.STATE_NOT_INSTALLED
    assert r["summary"].startswith("hip-python not importable")


@pytest.mark.parametrize("legacy", [False, True])
def test_installed_without_runtime(use_hip, legacy):
    pkg = use_hip(fake_hip(no_library=True, legacy=legacy))
    r = hip_probe.probe(INSTALLED, _C.arch_compat_table())
    assert r["state"] == hip_probe.STATE_NO_RUNTIME
    assert r["hip_python"] == pkg.__version__
    assert "no HIP runtime" in r["summary"] and DLOPEN_ERROR in r["summary"]
    assert r["error"] == f"hipRuntimeGetVersion: RuntimeError: {DLOPEN_ERROR}"
    assert r["runtime_version"] is None and r["device_count"] == 0 and r["devices"] == []
    assert pkg.calls == ["hipRuntimeGetVersion"]


def test_runtime_version_error_means_no_runtime(use_hip):
    use_hip(fake_hip(fail={"hipRuntimeGetVersion": hipError_t.hipErrorInsufficientDriver}))
    r = hip_probe.probe()
    assert r["state"] == hip_probe.STATE_NO_RUNTIME
    assert r["error"] == "hipRuntimeGetVersion: hipErrorInsufficientDriver"


@pytest.mark.parametrize("legacy", [False, True])
def test_runtime_with_two_devices(use_hip, legacy):
    use_hip(fake_hip(devices=[("AMD Instinct MI300X", "gfx942:sramecc+:xnack-"), ("Radeon RX 7900 XTX", "gfx1100")],
                     runtime=60443484, driver=60342134, legacy=legacy))
    r = hip_probe.probe(INSTALLED, _C.arch_compat_table())
    assert r["state"] == hip_probe.STATE_RUNTIME and r["error"] == ""
    assert r["runtime_version"]["text"] == "6.4.43484" and r["driver_version"]["text"] == "6.3.42134"
    assert r["device_count"] == 2 and r["device_error"] == r["init_error"] == r["driver_error"] == ""
    assert r["devices"] == [
        {"index": 0, "name": "AMD Instinct MI300X", "arch_raw": "gfx942:sramecc+:xnack-", "arch": "gfx942",
         "matching_builds": [{"arch": "gfx942", "mode": "native", "images": 8}]},
        {"index": 1, "name": "Radeon RX 7900 XTX", "arch_raw": "gfx1100", "arch": "gfx1100", "matching_builds": []},
    ]
    assert r["summary"] == "HIP runtime 6.4.43484, driver 6.3.42134, through hip-python " \
        f"{'7.2.2.562.43' if legacy else '10.0.0.0.1.2'}: 2 device(s)"
    json.dumps(r)  # the doctor's --json prints it


def test_runtime_without_device(use_hip):
    use_hip(fake_hip(devices=(), fail={"hipInit": hipError_t.hipErrorNoDevice}))
    r = hip_probe.probe(INSTALLED, _C.arch_compat_table())
    assert r["state"] == hip_probe.STATE_RUNTIME and r["device_count"] == 0 and r["devices"] == []
    assert r["init_error"] == "hipInit: hipErrorNoDevice"
    assert r["device_error"] == "hipGetDeviceCount: hipErrorNoDevice"
    assert r["summary"].endswith("0 device(s) (hipGetDeviceCount: hipErrorNoDevice)")


def test_failures_after_the_runtime_answers_are_kept_per_call(use_hip):
    pkg = use_hip(fake_hip(devices=[("MI250X", "gfx90a:sramecc+:xnack-"), ("MI300X", "gfx942")],
                           fail={"hipDriverGetVersion": hipError_t.hipErrorInsufficientDriver}))
    broken = pkg.hip.hipGetDeviceProperties
    pkg.hip.hipGetDeviceProperties = lambda index: broken(index) if index else (hipError_t.hipErrorInvalidDevice,
                                                                                 None)
    r = hip_probe.probe(INSTALLED, _C.arch_compat_table())
    assert r["state"] == hip_probe.STATE_RUNTIME and r["driver_version"] is None
    assert r["driver_error"] == "hipDriverGetVersion: hipErrorInsufficientDriver" and "driver unknown" in r["summary"]
    assert r["devices"][0] == {"index": 0, "error": "hipGetDeviceProperties: hipErrorInvalidDevice"}
    assert r["devices"][1]["arch"] == "gfx942"


@hip_python
def test_real_hip_python_without_runtime():
    """hip-python itself on this machine, which has no libamdhip64: it imports, and its first call fails."""
    r = hip_probe.probe(INSTALLED, _C.arch_compat_table())
    assert r["state"] == hip_probe.STATE_NO_RUNTIME, r
    assert r["hip_python"] and "failed to dlopen" in r["error"] and "libamdhip64" in r["error"]


@hip_python
def test_real_hip_python_against_the_hip_test_double(tmp_path):
    """hip-python itself, loading tests/fakes/fake_hip.c as libamdhip64.so: the probe reads the real binding."""
    cc = shutil.which("cc") or pytest.skip("no C compiler")
    lib = tmp_path / "lib" / "libamdhip64.so"
    lib.parent.mkdir()
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(FAKE_HIP)], check=True)
    # hip-python 10.x looks under ROCM_PATH/lib; 7.x dlopens the bare name, found through LD_LIBRARY_PATH.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}, "ROCM_PATH": str(tmp_path),
           "LD_LIBRARY_PATH": str(lib.parent), "FAKE_HIP_DEVICES": "2", "FAKE_HIP_ARCH": "gfx90a:sramecc+:xnack-",
           "FAKE_HIP_RUNTIME": "60443484", "FAKE_HIP_DRIVER": "60342134"}
    code = ("import json; from fa2rt import _C, hip_probe; "
            f"print(json.dumps(hip_probe.probe({INSTALLED!r}, _C.arch_compat_table())))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["state"] == hip_probe.STATE_RUNTIME, r
    assert r["runtime_version"]["text"] == "6.4.43484" and r["driver_version"]["text"] == "6.3.42134"
    assert r["device_count"] == 2
    assert [(d["index"], d["name"], d["arch_raw"], d["arch"]) for d in r["devices"]] == [
        (i, "Fake AMD GPU", "gfx90a:sramecc+:xnack-", "gfx90a") for i in range(2)]
    assert all(d["matching_builds"] == [{"arch": "gfx90a", "mode": "native", "images": 8}] for d in r["devices"])


# The doctor's use of the probe: its JSON section, its text, and --require rocm's message in each state.
def _result(rocm):
    """A doctor result with no GPU anywhere and the given rocm section, as verdict() and render_text() read it."""
    return {"checks": [], "devices": [], "decisions": [], "torch": {"gpu_available": False}, "build": {},
            "drivers": {"rocm": {"available": False, "error": "cannot open the HIP runtime library"}}, "rocm": rocm}


@pytest.mark.parametrize("pkg, state, says", [
    (None, hip_probe.STATE_NOT_INSTALLED, "hip-python not installed"),
    (fake_hip(no_library=True), hip_probe.STATE_NO_RUNTIME, "hip-python 10.0.0.0.1.2 installed, but no HIP runtime"),
    (fake_hip(devices=()), hip_probe.STATE_RUNTIME, "HIP runtime 6.3.42134, driver 6.3.42134, through hip-python "
     "10.0.0.0.1.2: 0 device(s) (hipGetDeviceCount: hipErrorNoDevice)"),
])
def test_require_rocm_names_the_state(use_hip, monkeypatch, pkg, state, says):
    use_hip(pkg)
    monkeypatch.setattr(doctor.builds, "current_build", lambda: SimpleNamespace(rows=()))
    rocm = doctor.rocm_view()
    assert rocm["state"] == state
    v = doctor.verdict(_result(rocm), "rocm")
    assert v["exit_code"] == doctor.EXIT_REQUIRE_UNMET
    assert rocm["summary"].startswith(says)
    assert v["problems"] == [f"--require rocm: no usable rocm GPU found; hip-python state {state}: {rocm['summary']}; "
                             "fa2rt's rocm driver probe: cannot open the HIP runtime library"]


def test_rocm_view_and_text_with_two_devices(use_hip, monkeypatch):
    use_hip(fake_hip(devices=[("AMD Instinct MI300X", "gfx942:sramecc+:xnack-"), ("Radeon RX 7900 XTX", "gfx1100")],
                     runtime=60443484))
    rows = [{"arch": arch} for arch in ("gfx90a", "gfx942", "sm90") for _ in range(8)]
    monkeypatch.setattr(doctor.builds, "current_build", lambda: SimpleNamespace(rows=rows))
    rocm = doctor.rocm_view()
    assert [d["matching_builds"] for d in rocm["devices"]] == [[{"arch": "gfx942", "mode": "native", "images": 8}], []]
    lines = doctor._render_rocm(rocm)
    assert lines == [
        "  runtime: HIP runtime 6.4.43484, driver 6.3.42134, through hip-python 10.0.0.0.1.2: 2 device(s)",
        "  device 0: AMD Instinct MI300X arch gfx942 (raw gfx942:sramecc+:xnack-); installed builds it runs: "
        "gfx942 (native, 8 images)",
        "  device 1: Radeon RX 7900 XTX arch gfx1100 (raw gfx1100); installed builds it runs: none",
    ]


def test_rocm_layer_failure_is_reported(monkeypatch):
    def boom():
        raise RuntimeError("no build")
    monkeypatch.setattr(doctor.builds, "current_build", boom)
    rocm = doctor._layer(doctor.rocm_view)
    assert rocm == {"error": "RuntimeError: no build"}
    assert doctor._render_rocm(rocm) == ["  probe failed: RuntimeError: no build"]
    problem = doctor.verdict(_result(rocm), "rocm")["problems"][0]
    assert "hip-python state probe failed: RuntimeError: no build" in problem
