"""The devices behind torch tensors, described for the native dispatcher."""

import functools

import torch

from . import _C


def torch_vendor() -> str:
    """Which GPU vendor this torch build drives: 'cuda', 'rocm' or 'none'."""
    if getattr(torch.version, "hip", None):
        return "rocm"
    if torch.version.cuda:
        return "cuda"
    return "none"


@functools.cache
def probe(vendor: str, index: int) -> "_C.DeviceInfo":
    """The device as the vendor driver reports it. Raises RuntimeError when the driver is unusable."""
    return _C.probe_device(vendor, index)


def describe(device: torch.device) -> tuple["_C.DeviceInfo", str, str]:
    """DeviceInfo for a tensor's device, plus a reason code and message when it is unusable ('' when usable)."""
    if device.type != "cuda":
        return _C.DeviceInfo("none", device.type), "not_gpu", f"tensors are on {device.type}, not a GPU"
    return _describe_gpu(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _describe_gpu(index: int) -> tuple["_C.DeviceInfo", str, str]:
    # Kept per device: the backend opens its driver library once per process, so neither answer changes (a probe
    # that raises is not kept).
    vendor = torch_vendor()
    status = _C.backend_status(vendor)
    if not status["available"]:
        return _C.DeviceInfo("none", "unknown"), "driver_unavailable", f"{vendor} driver: {status['error']}"
    return probe(vendor, index), "", ""


def gpu_unavailable_reasons(vendor: str) -> list[str]:
    """Why this process cannot run fa2rt on a `vendor` GPU; empty when it can."""
    reasons = []
    if torch_vendor() != vendor:
        reasons.append(f"torch {torch.__version__} is not a {vendor} build")
    elif not torch.cuda.is_available():
        reasons.append(f"torch sees no {vendor} GPU")
    status = _C.backend_status(vendor)
    if not status["available"]:
        reasons.append(f"fa2rt's {vendor} backend is unavailable: {status['error']}")
    return reasons
