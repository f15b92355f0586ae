"""The installed kernel images: every source's manifest, loaded once into one native registry.

Sources, in precedence order (an arch's images come from the first source that has that arch):
  FA2RT_KERNEL_DIR   when set, the only source (an override: a local build, a test)
  source install     fa2rt/kernels inside the package itself: the images of FA2RT_ARCHS of `pip install .`
                     (the core wheel has none)
  kernel packages    every distribution in the entry-point group fa2rt.kernels (fa2rt-kernels-<arch>, packages.py)
A kernel package is refused, with its reason, when its version is not this fa2rt's, its manifest is unreadable or of
another schema; a source whose archs an earlier source already gave is shadowed. Either is reported (capabilities(),
the doctor), never a crash and never a mix of two versions' images.
"""

import functools
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import _C, config, packages
from .schema import MANIFEST_SCHEMA

# Where a source comes from (Source.kind).
KIND_OVERRIDE, KIND_SOURCE_INSTALL, KIND_PACKAGE = config.KERNEL_DIR, "source install", "package"
# What became of it (Source.status).
LOADED, ABSENT, REFUSED, SHADOWED = "loaded", "absent", "refused", "shadowed"


@dataclass(frozen=True)
class Source:
    """One folder of images and its manifest, and whether its images are in the registry."""

    kind: str
    name: str  # the distribution of a package, else the kind
    version: str | None  # a package's version; None for the other kinds
    directory: Path
    status: str
    reason: str = ""  # why not loaded
    archs: tuple = ()
    rows: tuple = field(default=(), repr=False)
    triton_version: str | None = None  # the compiler that built the images (the manifest says)

    def summary(self) -> dict:
        return {"kind": self.kind, "name": self.name, "version": self.version, "directory": str(self.directory),
                "status": self.status, "reason": self.reason, "archs": list(self.archs), "images": len(self.rows),
                "triton_version": self.triton_version}


@dataclass(frozen=True)
class Build:
    directory: Path  # FA2RT_KERNEL_DIR, else fa2rt's own kernels/ folder
    manifest: dict | None  # that folder's manifest; None when it has none (a core wheel, or FA2RT_ARCHS empty)
    registry: "_C.Registry"
    error: str = ""  # why no image at all could be used ("" when the registry has images)
    rows: tuple = field(default=())  # every loaded source's manifest rows, in registry order
    sources: tuple = field(default=())  # every Source, loaded or not

    @functools.cached_property
    def families(self) -> dict:
        """Image name -> kernel family ("triton", "gluon_ws"): which argument names its launch takes."""
        return {row["name"]: row["family"] for row in self.rows}

    def unused_sources(self) -> list[Source]:
        return [s for s in self.sources if s.status != LOADED]

    def archs(self) -> list[str]:
        return [arch for s in self.sources if s.status == LOADED for arch in s.archs]

    def triton_versions(self) -> list[str]:
        return sorted({s.triton_version for s in self.sources if s.status == LOADED and s.triton_version})


def _image_file(directory: Path, entry: dict) -> "_C.ImageFile":
    f = _C.ImageFile()
    f.path = str(directory / entry["file"])
    f.sha256 = entry["sha256"]
    f.target = entry.get("target", "") or ""
    f.portable = bool(entry.get("portable", False))
    return f


def _tensor_map(entry: dict) -> "_C.TensorMap":
    m = _C.TensorMap()
    m.param, m.dtype, m.elem_size, m.swizzle, m.box = (entry[k] for k in ("param", "dtype", "elem_size", "swizzle",
                                                                          "box"))
    return m


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
    img.max_seqlen_k = row.get("max_seqlen_k", 0)  # absent in builds before it: no short images
    img.one_split = row.get("one_split", False)  # likewise: no one-split images
    img.dependent_launch = row.get("dependent_launch", False)  # likewise: every image launched plainly
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
    img.family = row["family"]
    img.flat_grid = row["flat_grid"]
    img.ctas_per_sm = row["ctas_per_sm"]
    img.tensor_maps = [_tensor_map(entry) for entry in row["tensor_maps"]]
    img.binary = _image_file(directory, row["binary"])
    if row.get("ptx"):
        img.has_ptx = True
        img.ptx = _image_file(directory, row["ptx"])
    return img


def read_source(kind: str, name: str, version: str | None, directory: Path) -> tuple[Source, dict | None, list]:
    """(Source, its manifest or None, its images as ImageInfo). An unreadable manifest raises (callers that must
    not fail turn it into a refusal); a manifest of another schema is a refusal."""
    path = directory / "manifest.json"
    if not path.is_file():
        return Source(kind, name, version, directory, ABSENT, f"no manifest at {path}"), None, []
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != MANIFEST_SCHEMA:
        why = f"manifest schema_version: expected {MANIFEST_SCHEMA}, got {manifest.get('schema_version')}"
        return Source(kind, name, version, directory, REFUSED, why), manifest, []
    rows = tuple(manifest["images"])
    infos = [_image_info(directory, row) for row in rows]
    archs = tuple(dict.fromkeys(row["arch"] for row in rows))
    source = Source(kind, name, version, directory, LOADED, archs=archs, rows=rows,
                    triton_version=manifest.get("triton_version"))
    return source, manifest, infos


def _read_package(found: "packages.Found", core_version: str) -> tuple[Source, list]:
    """A kernel package as a Source: refused (with the reason) when its version differs from the core's, it cannot
    be imported, or its manifest cannot be read or is not this arch's."""
    def refused(why, directory=Path()):
        return Source(KIND_PACKAGE, found.dist or f"entry point {found.arch}", found.version or None, directory,
                      REFUSED, why), []

    why = packages.version_problem(found, core_version)
    if why:
        return refused(why)
    try:
        directory = found.directory()
        source, _, infos = read_source(KIND_PACKAGE, found.dist, found.version, directory)
    except Exception as exc:  # noqa: BLE001 - a broken package is reported, never fatal
        return refused(f"cannot be read: {type(exc).__name__}: {exc}")
    if source.status == ABSENT:
        return replace(source, status=REFUSED), []
    if source.status == LOADED and source.archs != (found.arch,):
        return refused(f"registers arch {found.arch} but its manifest holds {', '.join(source.archs) or 'no images'}",
                       directory)
    return source, infos


def _merge(directory: Path, manifest: dict | None, candidates: list, nothing: str) -> Build:
    """One registry from candidates [(Source, infos)] in precedence order; nothing: the error when none loads."""
    registry, owner, names, sources, rows = _C.Registry(), {}, set(), [], []
    for source, infos in candidates:
        taken = [arch for arch in source.archs if arch in owner]
        if source.status == LOADED and taken:
            source = replace(source, status=SHADOWED, reason=", ".join(
                f"{arch} already comes from {owner[arch]}" for arch in taken))
        clash = sorted(names & {info.name for info in infos})
        if source.status == LOADED and clash:
            source = replace(source, status=REFUSED, reason=f"image names already loaded: {', '.join(clash[:3])}")
        if source.status == LOADED:
            for info in infos:
                registry.add(info)
            names.update(info.name for info in infos)
            owner.update({arch: f"{source.name} ({source.directory})" for arch in source.archs})
            rows += source.rows
        sources.append(source)
    error = "" if len(registry) else "; ".join([nothing] + [f"{s.name}: {s.reason}" for s in sources if s.reason])
    return Build(directory, manifest, registry, error=error, rows=tuple(rows), sources=tuple(sources))


def load_build(directory: Path) -> Build:
    """The images of one folder only (FA2RT_KERNEL_DIR)."""
    source, manifest, infos = read_source(KIND_OVERRIDE, KIND_OVERRIDE, None, directory)
    if source.status == LOADED and not infos:
        source = replace(source, status=ABSENT, reason=f"the manifest at {directory} lists no images")
    build = _merge(directory, manifest, [(source, infos)], "")
    return replace(build, error=source.reason if source.status != LOADED else build.error)


def load_installed(core_version: str) -> Build:
    """The source install's images and every kernel package's, merged."""
    own = config.installed_kernel_dir()
    source, manifest, infos = read_source(KIND_SOURCE_INSTALL, KIND_SOURCE_INSTALL, None, own)
    candidates = [(source, infos)] + [_read_package(f, core_version) for f in packages.found()]
    nothing = (f"no kernel images installed: none inside fa2rt (a source install's) and no usable package in the "
               f"entry-point group {packages.ENTRY_POINT_GROUP} (install fa2rt[<arch>] for "
               f"{', '.join(packages.kernel_archs())})")
    return _merge(own, manifest, candidates, nothing)


def core_version() -> str:
    from . import __version__  # the package sets it after importing its modules, this one included

    return __version__


@functools.cache
def _cached(override: str) -> Build:
    return load_build(Path(override)) if override else load_installed(core_version())


def current_build() -> Build:
    """The images the environment gives (FA2RT_KERNEL_DIR, else the installed ones), loaded once per setting."""
    return _cached(config.kernel_dir_override())


def sha256_state(source: Source) -> dict:
    """Every file a loaded source's manifest lists, hashed now: {"state", "files", "bad_files"}; state is "ok",
    "N of M files fail" or "not checked" (a source that is not loaded)."""
    if source.status != LOADED:
        return {"state": "not checked", "files": 0, "bad_files": []}
    files, bad = 0, []
    for row in source.rows:
        for entry in (row["binary"], row.get("ptx")):
            if not entry:
                continue
            files += 1
            path = source.directory / entry["file"]
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
            if digest != entry["sha256"]:
                bad.append(f"{entry['file']}: sha256 {digest}, manifest {entry['sha256']}")
    return {"state": f"{len(bad)} of {files} files fail" if bad else "ok", "files": files, "bad_files": bad}
