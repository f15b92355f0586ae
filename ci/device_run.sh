#!/usr/bin/env bash
# One device call: the GPU tox environment (builds fa2rt there, runs tests/gpu), the doctor, memcheck samples (dense,
# malformed varlen and kvcache indices) and the benchmarks (the grid with native sm90 images, then sm80 images
# through PTX; varlen; decode). Full logs go to $OUT. TESTS=0 skips the tests (still builds), BENCH=0 the benchmarks.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# tox itself comes from the carried wheels, in a folder of its own: anything else on PYTHONPATH (an fa2rt installed
# there by hand) would shadow the fa2rt that the tox environment builds.
TOXSITE=/tmp/fa2rt-toxsite
rm -rf "$TOXSITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$TOXSITE" .whl/*.whl || exit 1
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export PYTHONPATH=$TOXSITE:$SITE PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
step() { echo "== $1"; shift; "$@"; echo "== exit $?"; }
PY=.tox/gpu/bin/python
# scikit-build-core reuses build/ incrementally, and a copied tree's timestamps can make stale outputs look current.
rm -rf build
if [ "${TESTS:-1}" = 1 ]; then
step tox python3 -m tox -e gpu -- -q --durations=5 2>&1 | tee "$OUT/tox-gpu.log" | tail -40
step doctor $PY -m fa2rt.doctor --require cuda 2>&1 | tee "$OUT/doctor.txt" | tail -30
step memcheck compute-sanitizer --tool memcheck --error-exitcode 9 $PY ci/memcheck_sample.py 2>&1 | tee "$OUT/memcheck.log" | tail -6
for sample in varlen kvcache; do
  step memcheck-$sample compute-sanitizer --tool memcheck --error-exitcode 9 $PY ci/memcheck_$sample.py 2>&1 \
       | tee "$OUT/memcheck-$sample.log" | tail -3
done
else
  step build python3 -m tox -e gpu -- -q --collect-only 2>&1 | tail -3  # builds and installs fa2rt
fi
if [ "${BENCH:-1}" = 1 ]; then
  cp python/fa2rt/data/crossover.json "$OUT/crossover.json"
  step bench $PY -m fa2rt.bench --grid --memory --crossover --passes ${PASSES:-fwd,bwd,fwd+bwd} --out "$OUT" \
       --write-crossover "$OUT/crossover.json" 2>&1 | tee "$OUT/bench-native.txt" | tail -45
  step bench-varlen $PY -m fa2rt.bench --varlen --out "$OUT/varlen-h200.json" 2>&1 | tee "$OUT/bench-varlen.txt" | tail -40
  step bench-decode $PY -m fa2rt.bench --decode --out "$OUT/decode-h200.json" 2>&1 | tee "$OUT/bench-decode.txt" | tail -30
  FA2RT_FORCE_ARCH=sm80 step bench-sm80 $PY -m fa2rt.bench --grid --passes ${SM80_PASSES:-fwd,fwd+bwd} --dtype bfloat16 --head-dim 64 128 --out "$OUT/sm80" \
       2>&1 | tee "$OUT/bench-sm80.txt" | tail -15
fi
