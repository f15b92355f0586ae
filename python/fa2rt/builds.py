"""The installed kernel build: its manifest, loaded once into the native registry."""

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import _C, config
from .schema import MANIFEST_SCHEMA


@dataclass(frozen=True)
class Build:
    directory: Path
    manifest: dict | None  # None when no manifest exists (a build with FA2RT_ARCHS empty)
    registry: "_C.Registry"
    error: str = ""  # why the manifest could not be used
    rows: tuple = field(default=())


def _image_file(directory: Path, entry: dict) -> "_C.ImageFile":
    f = _C.ImageFile()
    f.path = str(directory / entry["file"])
    f.sha256 = entry["sha256"]
    f.target = entry.get("target", "") or ""
    f.portable = bool(entry.get("portable", False))
    return f


def _image_info(directory: Path, row: dict) -> "_C.ImageInfo":
    img = _C.ImageInfo()
    img.name = row["name"]
    img.op = row["op"]
    img.vendor = row["vendor"]
    img.arch = row["arch"]
    img.dtype = row["dtype"]
    img.head_dim = row["head_dim"]
    img.d_mask = row["d_mask"]
    img.features = row["features"]
    img.full_band_only = row["full_band_only"]
    img.layouts = row["layouts"]
    img.page_multiple = row["page_multiple"]
    img.optional_features = row["optional_features"]
    img.block_m = row["block_m"]
    img.block_n = row["block_n"]
    img.num_warps = row["num_warps"]
    img.warp_size = row["warp_size"]
    img.shared_bytes = row["shared_bytes"]
    img.align16 = row["align16"]
    img.strides8 = row["stride_unit"] == _C.STRIDE_MULTIPLE
    img.kernel_name = row["kernel_name"]
    img.params = [tuple(p) for p in row["params"]]
    img.scratch_params = row["scratch_params"]
    img.binary = _image_file(directory, row["binary"])
    if row.get("ptx"):
        img.has_ptx = True
        img.ptx = _image_file(directory, row["ptx"])
    return img


def load_build(directory: Path) -> Build:
    registry = _C.Registry()
    path = directory / "manifest.json"
    if not path.is_file():
        return Build(directory, None, registry, error=f"no manifest at {path}")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != MANIFEST_SCHEMA:
        return Build(directory, manifest, registry,
                     error=f"manifest schema_version: expected {MANIFEST_SCHEMA}, got {manifest.get('schema_version')}")
    for row in manifest["images"]:
        registry.add(_image_info(directory, row))
    return Build(directory, manifest, registry, rows=tuple(manifest["images"]))


@functools.cache
def _cached(directory: str) -> Build:
    return load_build(Path(directory))


def current_build() -> Build:
    """The build the environment points at (FA2RT_KERNEL_DIR or the installed one), loaded once per folder."""
    return _cached(str(config.kernel_dir()))
