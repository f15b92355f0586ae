"""Release wheels: the core wheel and per-arch kernel wheels, built by ci/build_wheels.sh, installed with no index and
no compiler into fresh virtual environments that have torch, then used (registry, selection, explain, report, doctor);
and the merging of kernel sources (source install, packages, refusals) in this process.

The kernel wheels are packed from the images of the installed fa2rt (FA2RT_IMAGES_FROM), so CI compiles no image a
second time; the core wheel is built for real (the native module, no images).
"""

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fa2rt import _C, builds, config, packages
from fa2rt import __version__ as VERSION

ROOT = Path(__file__).resolve().parents[2]
FAKES = ROOT / "tests" / "fakes"
INSTALL_LIMIT_S = 30  # the bar for installing the core and one kernel wheel on the 2-core CI machine


def _load_kernel_wheel():
    spec = importlib.util.spec_from_file_location("kernel_wheel", ROOT / "ci" / "kernel_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kernel_wheel = _load_kernel_wheel()


def _installed_archs(vendor: str) -> list[str]:
    src = next((s for s in builds.current_build().sources if s.kind == builds.KIND_SOURCE_INSTALL), None)
    rows = src.rows if src else ()
    return list(dict.fromkeys(r["arch"] for r in rows if r["vendor"] == vendor))


def _pick(vendor: str, preferred: str) -> str:
    archs = _installed_archs(vendor)
    if not archs:
        pytest.fail(f"the installed fa2rt has no {vendor} images to pack (build it with FA2RT_ARCHS including one)")
    return preferred if preferred in archs else archs[0]


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """ci/build_wheels.sh's wheels: the core, one NVIDIA and one AMD kernel wheel (from the installed images), and a
    kernel wheel of another version (for the refusal)."""
    nvidia, amd = _pick("cuda", "sm90"), _pick("rocm", "gfx942")
    out = tmp_path_factory.mktemp("wheels")
    env = dict(os.environ, FA2RT_ARCHS=f"{nvidia},{amd}", FA2RT_IMAGES_FROM=str(config.installed_kernel_dir()),
               PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "ci" / "build_wheels.sh"), str(out)], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout)
    built = re.findall(r"^built (\S+)\s+([\d.]+) MB\s+([\d.]+) s$", r.stdout, re.M)
    assert len(built) == 3, r.stdout
    stale = tmp_path_factory.mktemp("stale")
    kernel_wheel.write_wheel(config.installed_kernel_dir(), nvidia, stale, "0.0.9")
    return {"dir": out, "stale": stale, "nvidia": nvidia, "amd": amd, "log": r.stdout,
            "core": next(out.glob("fa2rt-*.whl")), "kernels": {arch: next(out.glob(f"fa2rt_kernels_{arch}-*.whl"))
                                                               for arch in (nvidia, amd)}}


# --- the wheels' contents --------------------------------------------------------------------------------------------

def test_core_wheel_has_the_native_module_and_no_images(wheelhouse):
    core = wheelhouse["core"]
    names = zipfile.ZipFile(core).namelist()
    assert any(re.fullmatch(r"fa2rt/_C\..*\.so", n) for n in names), names
    assert "fa2rt/packages.py" in names and not [n for n in names if n.startswith("fa2rt/kernels/")]
    assert "fa2rt/flash_attn/bert_padding.py" in names and "fa2rt/integrations/transformers.py" in names  # subpackages
    if importlib.util.find_spec("auditwheel"):
        # A manylinux tag (which one is the toolchain's: README, "Wheels"), and no library grafted in: the core
        # links only the system's C and C++ runtimes.
        assert re.search(r"-manylinux_2_\d+_x86_64\.whl$", core.name), core.name
        assert not [n for n in names if n.startswith("fa2rt.libs/")], names
    meta = _dist_file(core, "METADATA")
    for arch in packages.kernel_archs():
        assert f'Requires-Dist: fa2rt-kernels-{arch}=={VERSION}; extra == "{arch}"' in meta, meta
    assert 'Requires-Dist: fa2rt[cuda,rocm]; extra == "all"' in meta, meta


@pytest.mark.parametrize("which", ["nvidia", "amd"])
def test_kernel_wheel_holds_one_arch_and_its_entry_point(wheelhouse, which):
    arch = wheelhouse[which]
    wheel = wheelhouse["kernels"][arch]
    assert wheel.name == f"fa2rt_kernels_{arch}-{VERSION}-py3-none-any.whl"
    zf = zipfile.ZipFile(wheel)
    manifest = json.loads(zf.read(f"fa2rt_kernels_{arch}/kernels/manifest.json"))
    assert manifest["archs"] == [arch] and {r["arch"] for r in manifest["images"]} == {arch}
    assert len(manifest["images"]) == len([r for r in builds.current_build().rows if r["arch"] == arch])
    files = {n.rsplit("/", 1)[1] for n in zf.namelist() if n.startswith(f"fa2rt_kernels_{arch}/kernels/")}
    listed = {e["file"] for r in manifest["images"] for e in (r["binary"], r.get("ptx")) if e}
    assert files == listed | {"manifest.json"}
    assert _dist_file(wheel, "entry_points.txt") == f"[fa2rt.kernels]\n{arch} = fa2rt_kernels_{arch}\n"
    assert f"Requires-Dist: fa2rt=={VERSION}\n" in _dist_file(wheel, "METADATA")
    _check_record(zf)


def test_kernel_wheel_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="--images: expected a folder with manifest.json"):
        kernel_wheel.write_wheel(tmp_path, "sm90", tmp_path / "out", VERSION)
    src = config.installed_kernel_dir()
    with pytest.raises(ValueError, match="--arch sm75: .* has no images of it"):
        kernel_wheel.write_wheel(src, "sm75", tmp_path / "out", VERSION)
    arch = _pick("cuda", "sm90")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    row = next(r for r in json.loads((copy / "manifest.json").read_text())["images"] if r["arch"] == arch)
    victim = copy / row["binary"]["file"]
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(ValueError, match=f"{victim.name}: sha256 [0-9a-f]+, manifest {row['binary']['sha256']}"):
        kernel_wheel.write_wheel(copy, arch, tmp_path / "out", VERSION)


def _dist_file(wheel: Path, name: str) -> str:
    zf = zipfile.ZipFile(wheel)
    return zf.read(next(n for n in zf.namelist() if n.endswith(f".dist-info/{name}"))).decode()


def _check_record(zf: zipfile.ZipFile) -> None:
    record = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))).decode().splitlines()
    listed = {}
    for line in record:
        name, digest, size = line.rsplit(",", 2)
        listed[name] = (digest, size)
    assert set(listed) == set(zf.namelist())
    for name, (digest, size) in listed.items():
        if digest:
            assert kernel_wheel._record_line(name, zf.read(name)) == f"{name},{digest},{size}"


# --- FA2RT_PYTHONS: which interpreters get a core wheel (--dry-run: resolved, nothing built) --------------------------

FAKE_PYTHON = """#!/bin/sh
# Answers build_wheels.sh's interpreter probe as {impl} {major}.{minor}; lacks the build tools (every other -c fails).
case "$2" in *version_info*) echo "{impl} {major} {minor} $0" ;; *) exit 1 ;; esac
"""


def _fake_python(folder: Path, name: str, impl: str = "cpython", major: int = 3, minor: int = 13) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(FAKE_PYTHON.format(impl=impl, major=major, minor=minor))
    path.chmod(0o755)
    return path


def _dry_run(tmp_path: Path, pythons: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FA2RT_")}
    env.update(PYTHON=sys.executable, FA2RT_ARCHS="sm90,gfx942", PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    if pythons is not None:
        env["FA2RT_PYTHONS"] = pythons
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "ci" / "build_wheels.sh"), "--dry-run", str(out)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert not out.exists()
    return r


def test_build_wheels_builds_a_core_per_python_named(tmp_path):
    here = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    r = _dry_run(tmp_path, None)  # the default: the running Python only (CI's one core build)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"plan core {here} {sys.executable} (build tools: present)",
                                     "plan kernels sm90", "plan kernels gfx942"]

    other = 12 if sys.version_info[:2] == (3, 13) else 13
    by_path = _fake_python(tmp_path / "bin", f"python3.{other}", minor=other)
    _fake_python(tmp_path / "bin", "python3.10-release", minor=10)
    r = _dry_run(tmp_path, f" {by_path},{sys.executable}  python3.10-release ")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:3] == [
        f"plan core cp3{other} {by_path} (build tools: missing, set FA2RT_BUILD_VENVS=1)",
        f"plan core {here} {sys.executable} (build tools: present)",
        f"plan core cp310 {tmp_path / 'bin' / 'python3.10-release'} (build tools: missing, set FA2RT_BUILD_VENVS=1)"]


@pytest.mark.parametrize("case", ["unknown", "old", "pypy", "twice", "empty"])
def test_build_wheels_refuses_pythons_it_cannot_build_for(tmp_path, case):
    bin_dir = tmp_path / "bin"
    pythons, expected = {
        "unknown": ("python3.99", "FA2RT_PYTHONS: expected interpreter paths or names on PATH, got 'python3.99'"),
        "old": (str(_fake_python(bin_dir, "py39", minor=9)), "expected CPython 3.10 or newer, got '"),
        "pypy": (str(_fake_python(bin_dir, "pypy3", impl="pypy", minor=10)), ": pypy 3.10"),
        "twice": (f"{_fake_python(bin_dir, 'a', minor=12)} {_fake_python(bin_dir, 'b', minor=12)}",
                  f"two interpreters give the cp312 wheel: {bin_dir / 'a'} and '{bin_dir / 'b'}'"),
        "empty": (" , ", "FA2RT_PYTHONS: expected at least one interpreter, got ' , '"),
    }[case]
    r = _dry_run(tmp_path, pythons)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert expected in r.stderr, r.stderr


# --- installed into a fresh environment that has torch ---------------------------------------------------------------

def _requirement_closure(roots) -> list[importlib.metadata.Distribution]:
    """The installed distributions roots need (markers evaluated here; requirements not installed are skipped)."""
    seen, todo, out = set(), list(roots), []
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        out.append(dist)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return out


def _top_level_entries(dist: importlib.metadata.Distribution) -> set[Path]:
    base = Path(dist.locate_file(""))
    return {base / Path(f).parts[0] for f in dist.files or () if not Path(f).parts[0].startswith("..")
            and (base / Path(f).parts[0]).exists()}


@pytest.fixture(scope="module")
def torch_overlay(tmp_path_factory):
    """A folder holding links to torch and what it needs (and packaging, numpy): put on a venv's path by a
    .pth file, it gives the venv torch without copying it and without this environment's fa2rt."""
    overlay = tmp_path_factory.mktemp("torch-overlay")
    for dist in _requirement_closure(["torch", "packaging", "numpy"]):  # numpy: torch warns on import without it
        for entry in _top_level_entries(dist):
            if not (overlay / entry.name).exists():
                (overlay / entry.name).symlink_to(entry)
    return overlay


def _fresh_venv(path: Path, overlay: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "fa2rt-test-torch.pth").write_text(f"{overlay}\n")
    return python


def _no_compiler_env(venv_python: Path) -> dict:
    path = str(venv_python.parent)
    for tool in ("cc", "gcc", "g++", "c++", "clang", "cmake", "nvcc", "hipcc"):
        assert shutil.which(tool, path=path) is None, tool
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FA2RT_", "FAKE_", "PIP_"))}
    # pip reads no configuration (this machine's may add indexes or constraints): only the wheels given.
    env.update(PATH=path, CC="/nonexistent/cc", CXX="/nonexistent/c++", PIP_CONFIG_FILE=os.devnull,
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _pip_install(venv_python: Path, *args) -> float:
    env = _no_compiler_env(venv_python)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv_python), "install", "--no-index",
                        "--no-cache-dir", *args], env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Building wheel" not in r.stdout and "setup.py" not in r.stdout, r.stdout
    return elapsed


PROBE = """
import json, sys, warnings
import torch
import fa2rt
from fa2rt import _C, builds, devices
arch = sys.argv[1]
build = builds.current_build()
report = fa2rt.capabilities()
dev = {"sm80": _C.DeviceInfo("cuda", "sm80", 166912, 108, 32, "A100"),
       "sm89": _C.DeviceInfo("cuda", "sm89", 101376, 142, 32, "L40S"),
       "sm90": _C.DeviceInfo("cuda", "sm90", 232448, 132, 32, "H100"),
       "gfx90a": _C.DeviceInfo("rocm", "gfx90a", 65536, 104, 64, "MI250X"),
       "gfx942": _C.DeviceInfo("rocm", "gfx942", 65536, 304, 64, "MI300X")}
p = _C.Problem()
p.dtype, p.head_dim, p.batch, p.seqlen_q, p.seqlen_k, p.nheads, p.nheads_k = "bf16", 128, 2, 1024, 1024, 16, 16
p.max_head_extent = 1024 * 16 * 128
selected = {a: _C.select(p, d, build.registry)["image"] for a, d in dev.items()}
devices.describe = lambda device: (dev[arch], "", "")
q = torch.randn(1, 1024, 4, 64, dtype=torch.bfloat16)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    d = fa2rt.explain(q, q, q)
from fa2rt import doctor  # its [build] section alone: the whole doctor runs numerical checks (seconds)
listing = doctor._render_sources(doctor.verify_build(), [])
print(json.dumps({"file": fa2rt.__file__, "build": report["build"] | {"images": len(report["build"]["images"])},
                  "selected": selected, "explain": [d.path, d.reason, d.message], "doctor_build": listing}))
"""


def _probe(venv_python: Path, explain_arch: str) -> dict:
    r = subprocess.run([str(venv_python), "-c", PROBE, explain_arch], env=_no_compiler_env(venv_python),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def _fake_cuda(tmp_path: Path) -> Path:
    cc = shutil.which("cc") or pytest.fail("no C compiler to build the CUDA driver test double")
    lib = tmp_path / "libfake_cuda.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(FAKES / "fake_cuda.c")], check=True)
    return lib


def test_core_and_one_kernel_wheel_install_without_a_compiler_and_run(wheelhouse, torch_overlay, tmp_path):
    nvidia, amd = wheelhouse["nvidia"], wheelhouse["amd"]
    python = _fresh_venv(tmp_path / "venv", torch_overlay)
    seconds = _pip_install(python, "--find-links", str(wheelhouse["dir"]), f"fa2rt[{nvidia}]=={VERSION}")
    print(f"install of fa2rt + fa2rt-kernels-{nvidia} from local wheels: {seconds:.1f} s")
    assert seconds < INSTALL_LIMIT_S * 4, seconds  # the bar is 30 s; CI machines are shared, so only gross misses fail

    out = _probe(python, amd)
    assert out["file"].startswith(str(tmp_path / "venv")), out["file"]
    b = out["build"]
    assert b["archs"] == [nvidia] and b["error"] == ""
    installed = len([r for r in builds.current_build().rows if r["arch"] == nvidia])
    assert b["images"] == installed
    (pkg,) = [s for s in b["sources"] if s["kind"] == "package"]
    assert (pkg["name"], pkg["version"], pkg["archs"], pkg["images"], pkg["status"]) == (
        f"fa2rt-kernels-{nvidia}", VERSION, [nvidia], installed, "loaded")
    assert pkg["sha256"]["state"] == "ok" and pkg["sha256"]["files"] >= installed
    assert out["selected"][nvidia].startswith(f"fwd-{nvidia}-")
    assert out["selected"][amd] is None
    path, reason, message = out["explain"]
    assert (path, reason) == ("fallback", "no_kernel")
    assert f"fa2rt-kernels-{amd} serves {amd} (native): pip install fa2rt-kernels-{amd}=={VERSION}" in message

    # The doctor on a machine with a (test double) GPU of an arch whose package is missing: the pip line.
    missing = "sm80" if nvidia != "sm80" else "sm89"
    env = _no_compiler_env(python) | {"FA2RT_CUDA_LIBRARY": str(_fake_cuda(tmp_path)), "FAKE_CUDA_DEVICES": "1",
                                      "FAKE_CUDA_CC": missing[2:], "FAKE_CUDA_SHARED_OPTIN": "166912"}
    r = subprocess.run([str(python), "-m", "fa2rt.doctor"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"fa2rt-kernels-{nvidia} {VERSION}: {nvidia}, {installed} images, sha256 ok" in r.stdout, r.stdout
    assert f"cuda:0 ({missing}) has no kernel images: fa2rt-kernels-{missing} serves {missing}" in r.stdout
    assert f"pip install fa2rt-kernels-{missing}=={VERSION}" in r.stdout.split("[verdict]")[1]


def test_a_kernel_package_of_another_version_is_refused_with_its_reason(wheelhouse, torch_overlay, tmp_path):
    nvidia, amd = wheelhouse["nvidia"], wheelhouse["amd"]
    python = _fresh_venv(tmp_path / "venv", torch_overlay)
    _pip_install(python, "--find-links", str(wheelhouse["dir"]), f"fa2rt[{amd}]=={VERSION}")
    # pip itself would refuse it (it requires fa2rt==0.0.9): an install with --no-deps is how such a mix happens.
    _pip_install(python, "--no-deps", str(next(wheelhouse["stale"].glob("*.whl"))))

    out = _probe(python, nvidia)
    assert out["build"]["archs"] == [amd]
    stale = next(s for s in out["build"]["sources"] if s["name"] == f"fa2rt-kernels-{nvidia}")
    assert stale["status"] == "refused" and stale["images"] == 0
    why = (f"fa2rt-kernels-{nvidia} 0.0.9 was built for fa2rt 0.0.9, this is fa2rt {VERSION}; install the matching "
           f"one: pip install fa2rt-kernels-{nvidia}=={VERSION}")
    assert stale["reason"] == why
    assert out["selected"][amd].startswith(f"fwd-{amd}-") and out["selected"][nvidia] is None
    assert f"fa2rt-kernels-{nvidia} is installed but refused: {why}" in out["explain"][2]

    assert f"  fa2rt-kernels-{nvidia} 0.0.9: refused: {why}" in out["doctor_build"]


# --- merging kernel sources in this process --------------------------------------------------------------------------

def _site_with_package(tmp_path: Path, arch: str, version: str = VERSION, edit=None) -> Path:
    """A folder laid out as an installed kernel package (its wheel unpacked), for sys.path."""
    wheel = kernel_wheel.write_wheel(config.installed_kernel_dir(), arch, tmp_path / "whl", version)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    if edit:
        edit(site / f"fa2rt_kernels_{arch}" / "kernels" / "manifest.json")
    return site


@pytest.fixture
def with_site(monkeypatch):
    def use(site: Path):
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.delenv(config.KERNEL_DIR, raising=False)
        for name in [m for m in sys.modules if m.startswith(packages.MODULE_PREFIX)]:
            monkeypatch.delitem(sys.modules, name)  # an earlier test's package of the same arch
        builds._cached.cache_clear()
    yield use
    builds._cached.cache_clear()


def test_source_install_images_win_over_a_package_of_the_same_arch(tmp_path, with_site):
    arch = _pick("cuda", "sm90")
    with_site(_site_with_package(tmp_path, arch))
    build = builds.current_build()
    own = build.sources[0]
    (pkg,) = [s for s in build.sources if s.kind == builds.KIND_PACKAGE and s.directory.is_relative_to(tmp_path)]
    assert own.kind == builds.KIND_SOURCE_INSTALL and own.status == builds.LOADED and arch in own.archs
    assert pkg.name == f"fa2rt-kernels-{arch}" and pkg.status == builds.SHADOWED
    assert pkg.reason.startswith(f"{arch} already comes from source install ({config.installed_kernel_dir()}")
    assert len(build.registry) == sum(len(s.rows) for s in build.sources if s.status == builds.LOADED)
    assert sum(row["arch"] == arch for row in build.rows) == sum(row["arch"] == arch for row in own.rows)


def test_a_package_whose_manifest_is_not_its_arch_or_unreadable_is_refused(tmp_path, with_site):
    arch = _pick("rocm", "gfx942")

    def relabel(manifest: Path):
        data = json.loads(manifest.read_text())
        data["archs"], data["images"] = ["gfx90a"], [dict(r, arch="gfx90a") for r in data["images"]]
        manifest.write_text(json.dumps(data))

    with_site(_site_with_package(tmp_path / "a", arch, edit=relabel))
    with_site(_site_with_package(tmp_path / "b", _pick("cuda", "sm90"), edit=lambda m: m.write_text("{broken")))
    build = builds.current_build()
    refused = {s.name: s.reason for s in build.sources if s.status == builds.REFUSED}
    assert refused[f"fa2rt-kernels-{arch}"] == f"registers arch {arch} but its manifest holds gfx90a"
    assert refused[f"fa2rt-kernels-{_pick('cuda', 'sm90')}"].startswith("cannot be read: JSONDecodeError")
    assert build.error == "" and len(build.registry) > 0


def test_kernel_dir_override_is_the_only_source(monkeypatch):
    monkeypatch.setenv(config.KERNEL_DIR, str(config.installed_kernel_dir()))
    build = builds.current_build()
    assert [s.kind for s in build.sources] == [builds.KIND_OVERRIDE]
    assert build.rows and build.archs() == list(json.loads(
        (config.installed_kernel_dir() / "manifest.json").read_text())["archs"])


def test_no_images_anywhere_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "installed_kernel_dir", lambda: tmp_path)
    monkeypatch.setattr(packages, "found", lambda: [])
    build = builds.load_installed(VERSION)
    assert len(build.registry) == 0
    assert build.error == (
        "no kernel images installed: none inside fa2rt (a source install's) and no usable package in the entry-point "
        "group fa2rt.kernels (install fa2rt[<arch>] for sm80, sm89, sm90, gfx90a, gfx942); source install: no "
        f"manifest at {tmp_path / 'manifest.json'}")


def test_suggestions_follow_the_architecture_table():
    dev = {"sm86": _C.DeviceInfo("cuda", "sm86", 101376, 84, 32, "A10"),
           "sm120": _C.DeviceInfo("cuda", "sm120", 101376, 170, 32, "RTX 5090"),
           "gfx1100": _C.DeviceInfo("rocm", "gfx1100", 65536, 48, 32, "RX 7900 XTX")}
    assert packages.suggestion(dev["sm86"], VERSION)["pip"] == f"pip install fa2rt-kernels-sm80=={VERSION}"
    assert packages.suggestion(dev["sm120"], VERSION)["pip"] == f'pip install "fa2rt[cuda]=={VERSION}"'
    assert packages.suggestion(dev["gfx1100"], VERSION) == {
        "arch": "gfx1100", "packages": [], "pip": "",
        "text": "no fa2rt kernel package serves gfx1100 (packages exist for sm80, sm89, sm90, gfx90a, gfx942)"}


def test_pyproject_extras_pin_the_kernel_packages_to_the_core_version():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == VERSION == kernel_wheel.core_version()
    extras = project["optional-dependencies"]
    pin = {arch: f"fa2rt-kernels-{arch}=={VERSION}" for arch in packages.kernel_archs()}
    for arch in packages.kernel_archs():
        assert extras[arch] == [pin[arch]]
    assert extras["cuda"] == [pin[a] for a in packages.kernel_archs() if a.startswith("sm")]
    assert set(extras["rocm"]) == {pin[a] for a in packages.kernel_archs() if a.startswith("gfx")} | {"hip-python"}
    assert extras["all"] == ["fa2rt[cuda,rocm]"]  # pip resolves an extra that names the project's own extras
