"""Kernel packages: the per-arch distributions `fa2rt-kernels-<arch>` that carry kernel images, how fa2rt finds
them (the entry-point group), and which package serves a device that has no images.

A kernel package is a `py3-none-any` wheel holding one module, `fa2rt_kernels_<arch>`, whose `kernels/` folder has
manifest.json and the images; it registers `<arch> = fa2rt_kernels_<arch>` in the entry-point group ENTRY_POINT_GROUP
and requires the core's exact version (ci/kernel_wheel.py writes it). The loading and merging is builds.py's.
"""

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from . import _C

ENTRY_POINT_GROUP = "fa2rt.kernels"
DIST_PREFIX = "fa2rt-kernels-"
MODULE_PREFIX = "fa2rt_kernels_"
KERNEL_FOLDER = "kernels"  # inside the package's module, as inside fa2rt itself


def kernel_archs() -> tuple[str, ...]:
    """The archs a kernel package exists for: the image archs of the dispatcher's compatibility table."""
    return tuple(dict.fromkeys(image for _, image, _ in _C.arch_compat_table()))


def distribution_name(arch: str) -> str:
    return DIST_PREFIX + arch


def pip_line(arch: str, version: str) -> str:
    return f"pip install {distribution_name(arch)}=={version}"


@dataclass(frozen=True)
class Found:
    """One entry point of ENTRY_POINT_GROUP, before loading: the arch it claims and its distribution."""

    arch: str  # the entry point's name
    dist: str  # the distribution's name ("" when the entry point has no distribution metadata)
    version: str
    entry_point: importlib.metadata.EntryPoint

    def directory(self) -> Path:
        """The package's kernels/ folder; imports the package module (tiny: no code runs but its own import)."""
        module = self.entry_point.load()
        return Path(module.__file__).resolve().parent / KERNEL_FOLDER


def found() -> list[Found]:
    """Every installed kernel package, in the compatibility table's arch order (unknown archs last, by name)."""
    order = {arch: i for i, arch in enumerate(kernel_archs())}
    out = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        out.append(Found(ep.name, dist.metadata["Name"] if dist else "", dist.version if dist else "", ep))
    return sorted(out, key=lambda f: (order.get(f.arch, len(order)), f.arch, f.dist))


def version_problem(f: Found, core_version: str) -> str:
    """Why a found package cannot be used with this fa2rt ('' when it can)."""
    if not f.dist:
        return f"entry point {f.arch} = {f.entry_point.value} has no distribution metadata (its version is unknown)"
    if f.version != core_version:
        return (f"{f.dist} {f.version} was built for fa2rt {f.version}, this is fa2rt {core_version}; "
                f"install the matching one: {pip_line(f.arch, core_version)}")
    return ""


def serving_archs(info: "_C.DeviceInfo") -> list[tuple[str, str]]:
    """(image arch, load mode) of the kernel packages that would run on this device, best first."""
    return [(image, mode) for device, image, mode in _C.arch_compat_table() if device == info.arch]


def _newer_nvidia(info: "_C.DeviceInfo") -> bool:
    """An NVIDIA arch newer than every row of the table: it runs the newest portable PTX of any installed build."""
    table = [int(device[2:]) for device, _, _ in _C.arch_compat_table() if device.startswith("sm")]
    return info.vendor == "cuda" and info.arch.startswith("sm") and info.arch[2:].isdigit() and (
        int(info.arch[2:]) > max(table))


def suggestion(info: "_C.DeviceInfo", core_version: str, refused=()) -> dict:
    """What to install so that this device gets images: {"arch", "packages", "pip", "text"}; refused: the kernel
    sources builds.py turned down, whose reasons are repeated for the packages that would serve."""
    serving = serving_archs(info)
    if serving:
        arch = serving[0][0]
        packages = [distribution_name(arch)]
        pip = pip_line(arch, core_version)
        text = f"{packages[0]} serves {info.arch} ({serving[0][1]}): {pip}"
    elif _newer_nvidia(info):
        packages = [distribution_name(a) for a in kernel_archs() if a.startswith("sm")]
        pip = f'pip install "fa2rt[cuda]=={core_version}"'
        text = f"{info.arch} runs the newest portable PTX of the NVIDIA kernel packages (JIT-compiled): {pip}"
    else:
        packages, pip = [], ""
        text = f"no fa2rt kernel package serves {info.arch} (packages exist for {', '.join(kernel_archs())})"
    notes = [f"{s.name} is installed but refused: {s.reason}" for s in refused if s.name in packages]
    return {"arch": info.arch, "packages": packages, "pip": pip, "text": "; ".join([text] + notes)}


def missing(info: "_C.DeviceInfo", build, core_version: str) -> dict | None:
    """suggestion() when none of the build's images may run on this device (no image of an arch it runs), else
    None. build: a builds.Build."""
    runs = {arch for arch, _ in _C.compatible_archs(info, build.registry)}
    if any(img.vendor == info.vendor and img.arch in runs for img in build.registry.images()):
        return None
    return suggestion(info, core_version, build.unused_sources())
