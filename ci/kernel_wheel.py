"""Writes the kernel wheel of one arch: fa2rt_kernels_<arch>-<version>-py3-none-any.whl.

    python ci/kernel_wheel.py --images DIR --arch ARCH --out OUTDIR [--version V]

DIR holds a manifest.json (as backends/kernels/aot.py writes it, any number of archs) and its image files; the wheel
gets that arch's rows and files only, checked against their sha256 first. The wheel holds one module,
fa2rt_kernels_<arch>, whose kernels/ folder has the images and their manifest; it registers `<arch> =
fa2rt_kernels_<arch>` in the entry-point group fa2rt.kernels and requires fa2rt==<version> (default: pyproject's
version), the version fa2rt checks before loading it (python/fa2rt/builds.py).

Standard library only, written directly as a zip (PEP 427): the wheel is data, so no build backend is needed, and
the entries are sorted with fixed times so the same images give the same bytes.
"""

import argparse
import base64
import hashlib
import importlib.util
import json
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT_GROUP = "fa2rt.kernels"  # python/fa2rt/packages.py reads this group
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip stores: reproducible bytes
TAG = "py3-none-any"


def manifest_schema() -> int:
    """python/fa2rt/schema.py's MANIFEST_SCHEMA, loaded by path (fa2rt itself needs torch)."""
    spec = importlib.util.spec_from_file_location("_fa2rt_schema", ROOT / "python" / "fa2rt" / "schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MANIFEST_SCHEMA


def core_version(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The [project] version of pyproject.toml (a regex: tomllib is 3.11+ and this runs on 3.10 too)."""
    match = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M | re.S)
    if not match:
        raise ValueError(f"{pyproject}: no version in [project]")
    return match.group(1)


def arch_manifest(images: Path, arch: str) -> tuple[dict, list[Path]]:
    """The manifest of `arch`'s rows only, and the files it lists, each checked against its sha256."""
    path = images / "manifest.json"
    if not path.is_file():
        raise ValueError(f"--images: expected a folder with manifest.json, got {images}")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != manifest_schema():
        raise ValueError(f"{path}: schema_version expected {manifest_schema()}, got {manifest.get('schema_version')}")
    rows = [row for row in manifest["images"] if row["arch"] == arch]
    if not rows:
        raise ValueError(f"--arch {arch}: {path} has no images of it (archs: {', '.join(manifest.get('archs', []))})")
    files = []
    for row in rows:
        for entry in (row["binary"], row.get("ptx")):
            if entry:
                file = images / entry["file"]
                digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else "missing"
                if digest != entry["sha256"]:
                    raise ValueError(f"{file}: sha256 {digest}, manifest {entry['sha256']}")
                files.append(file)
    return {**manifest, "archs": [arch], "images": rows}, files


def _metadata(dist: str, version: str, arch: str) -> str:
    return "\n".join([
        "Metadata-Version: 2.1",
        f"Name: {dist}",
        f"Version: {version}",
        f"Summary: fa2rt kernel images for {arch} (data; fa2rt finds them through {ENTRY_POINT_GROUP})",
        "License: Apache-2.0",
        "Requires-Python: >=3.10",
        f"Requires-Dist: fa2rt=={version}",
        "",
    ])


def _module_init(arch: str, version: str) -> str:
    return (f'"""fa2rt kernel images for {arch}: data only, in kernels/ (manifest.json and the images). fa2rt finds '
            f'them through the\nentry-point group {ENTRY_POINT_GROUP}; nothing here is meant to be imported by '
            f'users."""\n\nARCH = "{arch}"\n__version__ = "{version}"\n')


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_wheel(images: Path, arch: str, out: Path, version: str) -> Path:
    manifest, files = arch_manifest(images, arch)
    dist, module = f"fa2rt-kernels-{arch}", f"fa2rt_kernels_{arch}"
    info = f"{module}-{version}.dist-info"
    entries = {f"{module}/__init__.py": _module_init(arch, version).encode(),
               f"{module}/kernels/manifest.json": (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()}
    entries.update({f"{module}/kernels/{f.name}": f.read_bytes() for f in files})
    entries[f"{info}/METADATA"] = _metadata(dist, version, arch).encode()
    entries[f"{info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: fa2rt ci/kernel_wheel.py\nRoot-Is-Purelib: true\n"
                                f"Tag: {TAG}\n").encode()
    entries[f"{info}/entry_points.txt"] = f"[{ENTRY_POINT_GROUP}]\n{arch} = {module}\n".encode()
    record = [_record_line(name, data) for name, data in sorted(entries.items())] + [f"{info}/RECORD,,"]
    entries[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()

    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{module}-{version}-{TAG}.whl"
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        # dist-info last, as wheels conventionally end (installers read it first from the central directory anyway)
        for name in sorted(entries, key=lambda n: (n.startswith(info), n)):
            zi = zipfile.ZipInfo(name, ZIP_TIME)
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, entries[name])
    tmp.replace(wheel)
    return wheel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path, help="folder with manifest.json and the images")
    p.add_argument("--arch", required=True, help="the arch whose images go into the wheel, e.g. sm90")
    p.add_argument("--out", required=True, type=Path, help="folder the wheel is written to")
    p.add_argument("--version", help="the wheel's version and the fa2rt version it requires (default: pyproject's)")
    args = p.parse_args(argv)
    try:
        wheel = write_wheel(args.images, args.arch, args.out, args.version or core_version())
    except (ValueError, OSError) as exc:
        print(f"kernel_wheel: {exc}", file=sys.stderr)
        return 2
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
