#!/usr/bin/env bash
# One device call: the GPU tox environment (builds fa2rt there, runs tests/gpu), the doctor, a memcheck sample and
# the benchmark (native sm90 images, then sm80 images through PTX). Full logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export PYTHONPATH=/tmp/site:$SITE PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
step() { echo "== $1"; shift; "$@"; echo "== exit $?"; }
step tox python3 -m tox -e gpu -- -q -x --durations=5 2>&1 | tee "$OUT/tox-gpu.log" | tail -25
PY=.tox/gpu/bin/python
step doctor $PY -m fa2rt.doctor --require cuda 2>&1 | tee "$OUT/doctor.txt" | tail -30
step memcheck compute-sanitizer --tool memcheck --error-exitcode 9 $PY ci/memcheck_sample.py 2>&1 | tee "$OUT/memcheck.log" | tail -6
if [ "${BENCH:-1}" = 1 ]; then
  step bench $PY -m fa2rt.bench --out "$OUT" 2>&1 | tee "$OUT/bench-native.txt" | tail -26
  FA2RT_FORCE_ARCH=sm80 step bench-sm80 $PY -m fa2rt.bench --out "$OUT" 2>&1 | tee "$OUT/bench-sm80.txt" | tail -3
fi
