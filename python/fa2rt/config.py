"""Environment variables fa2rt reads: each is named and parsed here, once.

They are read on every call (tests and users change them between calls); only parsing is cached, by raw value.
"""

import contextlib
import os
from pathlib import Path

KERNEL_DIR = "FA2RT_KERNEL_DIR"  # folder with manifest.json and images, instead of every installed one
FORCE_ARCH = "FA2RT_FORCE_ARCH"  # run the images of this arch (through PTX on NVIDIA): testing older builds
MIN_SEQLEN = "FA2RT_MIN_SEQLEN"  # short-sequence threshold overriding the measured crossover data
DISABLE = "FA2RT_DISABLE"  # "1": never use kernels, always the SDPA fallback
CHECK_INDICES = "FA2RT_CHECK_INDICES"  # "1": check the values of index tensors on the GPU too (a device sync)
ROUTING = "FA2RT_ROUTING"  # "0": never route a call to an SDPA backend by the measured routing table
PDL = "FA2RT_PDL"  # "0": launch the decode merge plainly, not as a programmatic dependent of the decode kernel

ENV_VARS = {
    KERNEL_DIR: "folder holding manifest.json and the kernel images, used instead of the installed ones (default: "
                "fa2rt/kernels of a source install merged with every fa2rt-kernels-<arch> package)",
    FORCE_ARCH: "restrict selection to images of this arch, loaded through their PTX on NVIDIA (e.g. sm80)",
    MIN_SEQLEN: "use the fallback when seqlen_k is below this (overrides the measured per-arch crossover)",
    DISABLE: "set to 1 to disable every kernel (always fall back to SDPA)",
    CHECK_INDICES: "set to 1 to check the values of cu_seqlens on the GPU too (costs a device sync per call)",
    ROUTING: "set to 0 to run fa2rt's own kernel where the measured routing table (fa2rt/data/routing.json) "
             "sends a problem class to a faster SDPA backend",
    PDL: "set to 0 to launch the KV-cache merge kernel plainly after the decode kernel instead of as its "
         "programmatic dependent (sm90 images; for tools that do not follow programmatic dependent launches)",
}


_NAMES = tuple(ENV_VARS)
_RAW_NAMES = tuple(os.fsencode(name) for name in _NAMES)


def raw_values() -> tuple:
    """Every variable above as set now (None when unset), unparsed: part of the keys of cached per-call work, so a
    change of any of them is seen by the next call."""
    # os.environ.get costs ~0.5 us a name (key encoding, Mapping.get); on POSIX os.environ keeps the raw bytes in a
    # dict that its every update writes through, which a call reads in a fraction of that.
    data = getattr(os.environ, "_data", None)
    if os.name == "posix" and type(data) is dict:
        return tuple(map(data.get, _RAW_NAMES))
    return tuple(map(os.environ.get, _NAMES))


@contextlib.contextmanager
def overridden(name: str, value: str):
    """Environment variable `name` set to value inside (fa2rt reads its variables at every call), restored after:
    for tools that must see fa2rt's own kernels (the doctor, the benchmark)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def kernel_dir_override() -> str:
    """FA2RT_KERNEL_DIR as set now ("" when unset)."""
    return os.environ.get(KERNEL_DIR, "")


def installed_kernel_dir() -> Path:
    """The images a source install (`pip install .`) puts inside the package."""
    return Path(__file__).parent / "kernels"


def force_arch() -> str:
    return os.environ.get(FORCE_ARCH, "").strip()


def disabled() -> bool:
    return os.environ.get(DISABLE, "").strip() not in ("", "0")


def routing_enabled() -> bool:
    raw = os.environ.get(ROUTING, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{ROUTING}: expected 0 (off) or 1 (on, the default), got {raw!r}")
    return raw != "0"


def dependent_launch() -> bool:
    raw = os.environ.get(PDL, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{PDL}: expected 0 (off) or 1 (on, the default), got {raw!r}")
    return raw != "0"


def check_indices() -> bool:
    return os.environ.get(CHECK_INDICES, "").strip() not in ("", "0")


def min_seqlen_override() -> int | None:
    raw = os.environ.get(MIN_SEQLEN, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{MIN_SEQLEN}: expected a non-negative integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{MIN_SEQLEN}: expected a non-negative integer, got {value}")
    return value


# The fleet doctor's settings (python -m fa2rt.doctor --fleet): not read by the call path, so not in ENV_VARS.
FLEET_JOIN_TIMEOUT = "FA2RT_FLEET_JOIN_TIMEOUT"
FLEET_TIMEOUT = "FA2RT_FLEET_TIMEOUT"
FLEET_STAND_IN = "FA2RT_FLEET_STAND_IN"
FLEET_FAULT = "FA2RT_FLEET_FAULT"
FLEET_ENV_VARS = {
    FLEET_JOIN_TIMEOUT: "seconds rank 0 waits for every rank to check in (default 300)",
    FLEET_TIMEOUT: "seconds rank 0 waits for each rank at every later step, and the gloo collectives' timeout "
                   "(default 120)",
    FLEET_STAND_IN: "test knob: this rank describes itself as a GPU of this arch (decisions and facts; its numerical "
                    "check and speed probe still run on its real device)",
    FLEET_FAULT: "test knob: die:STEP, hang:STEP[:SECONDS], slow:FACTOR or perturb:RELATIVE (fa2rt.fleet.FAULTS)",
}
FLEET_TIMEOUT_DEFAULTS = {FLEET_JOIN_TIMEOUT: 300.0, FLEET_TIMEOUT: 120.0}


def fleet_timeout(name: str) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return FLEET_TIMEOUT_DEFAULTS[name]
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}: expected a positive number of seconds, got {raw!r}")
    return value
