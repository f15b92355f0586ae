"""The capability report: installed builds x visible devices, as structured data."""

import os

import torch

from . import _C, builds, config, packages, policy, routing

REPORT_SCHEMA = 1
VENDORS = ("cuda", "rocm")


def _image_summary(row: dict) -> dict:
    keys = ("name", "op", "vendor", "arch", "dtype", "head_dim", "features", "full_band_only", "max_seqlen_k",
            "one_split", "dependent_launch", "layouts", "block_m", "block_n", "num_warps", "num_stages", "shared_bytes",
            "resources")
    summary = {key: row.get(key) for key in keys}
    summary["ptx"] = (row.get("ptx") or {}).get("target")
    return summary


def kernel_sources(build: builds.Build) -> list[dict]:
    """Every kernel source (the kernel packages, a source install's images, FA2RT_KERNEL_DIR): name, version, archs,
    image count, whether it is loaded (else why not) and the sha256 state of its files, checked now."""
    return [{**source.summary(), "sha256": builds.sha256_state(source)} for source in build.sources]


def device_entry(info: "_C.DeviceInfo", build: builds.Build) -> dict:
    compat = _C.compatible_archs(info, build.registry)
    usable = [img.name for img in build.registry.images()
              if img.vendor == info.vendor and any(img.arch == arch for arch, _ in compat)
              and img.shared_bytes <= info.shared_optin_bytes]
    return {"index": info.index, "vendor": info.vendor, "name": info.name, "arch": info.arch,
            "arch_raw": info.arch_raw, "multiprocessors": info.multiprocessors, "warp_size": info.warp_size,
            "shared_optin_bytes": info.shared_optin_bytes,
            "compatible_archs": [{"arch": arch, "mode": mode} for arch, mode in compat],
            "usable_images": usable, "short_sequence": policy.short_sequence_rule(info.arch),
            "routing": routing.summary(info.arch),
            "missing_package": packages.missing(info, build, builds.core_version())}


def probe_devices() -> tuple[dict, list]:
    """Backend status per vendor and every device the available backends see (never raises)."""
    statuses, devices = {}, []
    for vendor in VENDORS:
        status = _C.backend_status(vendor)
        statuses[vendor] = status
        for index in range(status["device_count"] if status["available"] else 0):
            try:
                devices.append(_C.probe_device(vendor, index))
            except RuntimeError as exc:
                status.setdefault("probe_errors", []).append(f"device {index}: {exc}")
    return statuses, devices


def capabilities() -> dict:
    """Which kernel images are installed, which devices are visible, and which images each device can run."""
    build = builds.current_build()
    statuses, devices = probe_devices()
    return {
        "schema_version": REPORT_SCHEMA,
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None)},
        "build": {"directory": str(build.directory), "error": build.error,
                  "triton_version": ", ".join(build.triton_versions()) or None, "archs": build.archs(),
                  "images": [_image_summary(row) for row in build.rows],
                  "sources": kernel_sources(build)},
        "backends": statuses,
        "devices": [device_entry(info, build) for info in devices],
        "arch_table": [{"device": d, "image": i, "mode": m} for d, i, m in _C.arch_compat_table()],
        "environment": {name: os.environ.get(name) for name in config.ENV_VARS},
    }
