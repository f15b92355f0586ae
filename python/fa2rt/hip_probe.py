"""ROCm facts for the doctor, read through hip-python (the `hip` package) when it is installed.

This is a second opinion next to fa2rt's own HIP shim: it needs nothing from fa2rt's native module, and it tells
three states apart:

  not_installed  `from hip import hip` fails (hip-python is absent, or present but not importable)
  no_runtime     hip-python imports, but the HIP runtime does not answer: libamdhip64 cannot be loaded, or
                 hipRuntimeGetVersion returns an error
  runtime        the HIP runtime answers: its version, the driver's, the device count and every device's arch

What hip-python does, as observed with hip-python 10.0.0.0.1.2 (a metapackage: `hip` re-exports `rocm.bindings`
from rocm-bindings-hip) and 7.2.2.562.43 (the `hip` package itself) on a machine without ROCm:
  - the import succeeds without any ROCm library; libamdhip64 is opened on the first call;
  - when it cannot be opened, every call raises RuntimeError("failed to dlopen 'b'libamdhip64.so'': ..."), and a
    symbol the library lacks raises RuntimeError("failed to dlsym ...") (10.x binds hipGetDevicePropertiesR0600,
    so against a ROCm 5 runtime the device query fails that way: reported per device);
  - each call returns a tuple whose first item is a hipError_t (an IntEnum, hipSuccess == 0), then its outputs:
    hipRuntimeGetVersion() / hipDriverGetVersion() / hipGetDeviceCount() -> (err, int), hipInit(0) -> (err,);
    hipGetDeviceCount() answers (hipErrorNoDevice, 0) when there is no device;
  - hipGetDeviceProperties differs between releases: 10.x is hipGetDeviceProperties(index) -> (err, props) with
    `name` and `gcnArchName` as str; 7.x is hipGetDeviceProperties(props, index) -> (err,) on a caller-made
    hip.hipDeviceProp_t(), whose `name` and `gcnArchName` are bytes. Both are handled.
"""

import importlib
import importlib.metadata
import importlib.util

STATE_NOT_INSTALLED, STATE_NO_RUNTIME, STATE_RUNTIME = "not_installed", "no_runtime", "runtime"
HIP_SUCCESS = 0


def decode_hip_version(raw: int) -> dict:
    """HIP encodes versions as major * 10000000 + minor * 100000 + patch (hip_version.h, hipDriverGetVersion)."""
    raw = int(raw)
    major, minor, patch = raw // 10_000_000, raw // 100_000 % 100, raw % 100_000
    return {"raw": raw, "major": major, "minor": minor, "patch": patch, "text": f"{major}.{minor}.{patch}"}


def normalize_arch(raw: str) -> str:
    """"gfx942:sramecc+:xnack-" -> "gfx942": the feature suffixes dropped, as the native HIP shim does."""
    return raw.split(":", 1)[0]


def matching_builds(arch: str, installed: dict, compat) -> list[dict]:
    """The installed image archs a device of `arch` runs, in the order the compatibility table prefers them.

    installed: image count per arch of the installed build; compat: (device arch, image arch, mode) rows, the
    native arch_compat_table()."""
    return [{"arch": image_arch, "mode": mode, "images": installed[image_arch]}
            for device_arch, image_arch, mode in compat if device_arch == arch and installed.get(image_arch)]


def _text(value) -> str:
    """A char[] field as hip-python hands it out: str (10.x) or bytes (7.x), up to the first NUL."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(value).split("\0", 1)[0]


def _ok(err) -> bool:
    return int(err) == HIP_SUCCESS


def _error_name(err) -> str:
    return getattr(err, "name", None) or f"hipError {int(err)}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _hip_present() -> bool:
    try:
        return importlib.util.find_spec("hip") is not None
    except (ImportError, ValueError):  # a module without a spec (e.g. injected into sys.modules) is present
        return True


def _import_hip():
    """(the hip.hip module or None, hip-python's version, the bindings' HIP version, why the import failed)."""
    try:
        pkg = importlib.import_module("hip")
        hip = getattr(pkg, "hip", None) or importlib.import_module("hip.hip")  # what `from hip import hip` does
        if not hasattr(hip, "hipRuntimeGetVersion"):
            raise ImportError(f"module hip.hip ({getattr(hip, '__file__', '?')}) is not hip-python's")
    except Exception as exc:  # noqa: BLE001 - an unimportable hip-python is a state to report
        if not _hip_present():
            return None, None, None, f"hip-python not installed ({_describe(exc)})"
        return None, None, None, f"hip-python not importable (from hip import hip: {_describe(exc)})"
    version = getattr(pkg, "__version__", None) or getattr(pkg, "VERSION", None)  # 10.x has both, 7.x VERSION
    try:
        version = version or importlib.metadata.version("hip-python")
    except importlib.metadata.PackageNotFoundError:
        pass
    return hip, version, getattr(pkg, "HIP_VERSION_NAME", None), ""


def _device_properties(hip, index: int):
    """(err, props) under either hipGetDeviceProperties signature (see the module docstring)."""
    try:
        out = hip.hipGetDeviceProperties(index)  # hip-python >= 10: (err, props)
    except TypeError:  # hip-python 6.x/7.x: hipGetDeviceProperties(props, index) -> (err,)
        props = hip.hipDeviceProp_t()
        return hip.hipGetDeviceProperties(props, index)[0], props
    return out[0], out[1]


def _device(hip, index: int, installed: dict, compat) -> dict:
    entry = {"index": index}
    try:
        err, props = _device_properties(hip, index)
        if not _ok(err):
            return {**entry, "error": f"hipGetDeviceProperties: {_error_name(err)}"}
        raw = _text(props.gcnArchName)
        arch = normalize_arch(raw)
        return {**entry, "name": _text(props.name), "arch_raw": raw, "arch": arch,
                "matching_builds": matching_builds(arch, installed, compat)}
    except Exception as exc:  # noqa: BLE001 - one device's failure is reported with it, the others still probed
        return {**entry, "error": _describe(exc)}


def _call(hip, name: str, *args):
    """One hip-python call: (its outputs after the hipError_t, "") or (None, why it failed)."""
    try:
        err, *outputs = getattr(hip, name)(*args)
        return (outputs, "") if _ok(err) else (None, f"{name}: {_error_name(err)}")
    except Exception as exc:  # noqa: BLE001 - hip-python raises RuntimeError when it cannot dlopen/dlsym
        return None, f"{name}: {_describe(exc)}"


def probe(installed: dict | None = None, compat=()) -> dict:
    """The ROCm section of the doctor (never raises for anything hip-python or the runtime does).

    installed: image count per arch of the installed build; compat: the native arch_compat_table() rows."""
    installed = installed or {}
    out = {"state": STATE_NOT_INSTALLED, "summary": "", "hip_python": None, "bindings_hip_version": None,
           "error": "", "runtime_version": None, "driver_version": None, "driver_error": "", "init_error": "",
           "device_count": 0, "device_error": "", "devices": []}
    hip, version, bindings_version, why = _import_hip()
    if hip is None:
        out.update(error=why, summary=why)
        return out
    out.update(hip_python=version, bindings_hip_version=bindings_version)

    runtime, out["error"] = _call(hip, "hipRuntimeGetVersion")  # the first call: libamdhip64 is opened here
    if out["error"]:
        out["state"] = STATE_NO_RUNTIME
        out["summary"] = f"hip-python {version} installed, but no HIP runtime ({out['error']})"
        return out
    out["state"], out["runtime_version"] = STATE_RUNTIME, decode_hip_version(runtime[0])
    driver, out["driver_error"] = _call(hip, "hipDriverGetVersion")
    out["driver_version"] = decode_hip_version(driver[0]) if driver else None
    _, out["init_error"] = _call(hip, "hipInit", 0)
    count, out["device_error"] = _call(hip, "hipGetDeviceCount")  # (hipErrorNoDevice, 0) with no device
    out["device_count"] = int(count[0]) if count else 0
    out["devices"] = [_device(hip, i, installed, compat) for i in range(out["device_count"])]

    devices = f"{out['device_count']} device(s)"
    if not out["device_count"]:
        devices += f" ({out['device_error'] or out['init_error'] or 'none reported'})"
    out["summary"] = (f"HIP runtime {out['runtime_version']['text']}, driver "
                      f"{out['driver_version']['text'] if driver else 'unknown'}, through hip-python {version}: "
                      f"{devices}")
    return out
