#!/usr/bin/env bash
# One device call: fa2rt installed from wheels, as a user gets it. ci/build_wheels.sh builds the core and the NVIDIA
# kernel wheels here; the core + fa2rt-kernels-sm90 go into a fresh virtual environment over this machine's torch with
# --no-index (timed), checked by the doctor; then fa2rt[cuda] adds the sm80 and sm89 packages, whose images the GPU
# suite also runs through their PTX, and tests/gpu (or GPU_TESTS) runs against that installation. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
WHEELS=/tmp/fa2rt-wheels
VENV=/tmp/fa2rt-wheel-venv
mkdir -p "$OUT"
step() { echo "== $1"; shift; "$@"; local rc=$?; echo "== exit $rc"; return $rc; }

install() {  # extra
  local t0
  t0=$(date +%s.%N)
  step "install fa2rt[$1]" "$VENV/bin/python" -m pip install -q --no-index --no-cache-dir --find-links "$WHEELS" \
    "fa2rt[$1]" 2>&1 | tee -a "$OUT/install.log" || exit 1
  awk -v t0="$t0" -v t1="$(date +%s.%N)" -v x="$1" 'BEGIN { printf "install fa2rt[%s]: %.1f s\n", x, t1 - t0 }' \
    | tee -a "$OUT/install.log"
}

# The fa2rt under test must be the wheel's (an fa2rt elsewhere on PYTHONPATH would shadow it), and its only loaded
# image sources the kernel packages of the given archs, every file matching its sha256.
WHERE='
import json, sys
import fa2rt
venv, archs = sys.argv[1], sys.argv[2].split(",")
build = fa2rt.capabilities()["build"]
print(fa2rt.__file__)
print(json.dumps(build["sources"], indent=1))
assert fa2rt.__file__.startswith(venv), f"fa2rt comes from {fa2rt.__file__}, not {venv}"
loaded = [s for s in build["sources"] if s["status"] == "loaded"]
assert [(s["kind"], s["name"]) for s in loaded] == [("package", f"fa2rt-kernels-{a}") for a in archs], loaded
assert all(s["sha256"]["state"] == "ok" for s in loaded), loaded
'
where() {  # comma-separated archs
  (cd /tmp && "$VENV/bin/python" -c "$WHERE" "$VENV" "$1") 2>&1 | tee -a "$OUT/where.txt"
}

# scikit-build-core reuses build/ incrementally, and a copied tree's timestamps can make stale outputs look current.
rm -rf build "$WHEELS" "$VENV"
FA2RT_ARCHS=sm80,sm89,sm90 step wheels bash ci/build_wheels.sh "$WHEELS" 2>&1 | tee "$OUT/build-wheels.log" || exit 1
# torch, Triton and pytest are this machine's. Its python3 may itself be a virtual environment, whose packages a
# --system-site-packages venv would not see: a .pth file in the new venv puts them on its path, where pip sees them.
python3 -m venv "$VENV" || exit 1
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
"$VENV/bin/python" -c 'import site, sys; open(site.getsitepackages()[0] + "/machine.pth", "w").write(sys.argv[1])' \
  "$SITE" || exit 1
install sm90
step where-sm90 where sm90 || exit 1
step doctor "$VENV/bin/python" -m fa2rt.doctor --require cuda 2>&1 | tee "$OUT/doctor.txt" | tail -30
install cuda
step where-cuda where sm80,sm89,sm90 || exit 1
# GPU_TESTS: what pytest runs (default the whole GPU suite), e.g. a part of it when a device call is short.
step gpu-tests "$VENV/bin/python" -m pytest ${GPU_TESTS:-tests/gpu} -q --durations=5 -p no:cacheprovider 2>&1 \
  | tee "$OUT/gpu-tests.log" | tail -30
