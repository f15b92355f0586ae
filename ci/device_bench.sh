#!/usr/bin/env bash
# One device call for measurements only (ci/device_run.sh runs the tests): fa2rt built for sm90 into this machine's
# Python, then each step named in STEPS (default all, in this order) under its own time limit:
#   varlen        python -m fa2rt.bench --varlen -> $OUT/varlen-h200.json
#   tune-decode   backends/kernels/tune.py --op decode, sm90 buckets 64 and 128 -> $OUT/tune.json
#   decode-graphs python -m fa2rt.bench --decode --decode-graphs, contiguous caches -> $OUT/decode-graphs-h200.json
#   integrations  ci/bench_integrations.py -> $OUT/integrations-h200.json
#   host          ci/host_overhead.py, dense and --decode
#   decode        the whole decode grid (contiguous and paged caches) as eager calls, rep 50 ms -> $OUT/decode-h200.json
#   routing-tests tests/gpu/test_routing_gpu.py
#   routing       python -m fa2rt.bench --routing (both dtypes), written into the installed table
#                 -> $OUT/routing-h200.json, $OUT/routing.json (the table, for python/fa2rt/data)
#   routing-check the same for bf16 with the table installed (fa2rt as routed; issue 21's bar)
#                 -> $OUT/routing-check-h200.json
#   read-ceiling  ci/read_ceiling.py: what any read of a decode step's bytes reaches (not in the default STEPS)
#                 -> $OUT/read-ceiling-h200.json
# Console output of every step goes to $OUT/bench.log (files back from a device call are few: one log, JSON results).
set -uo pipefail
OUT=${OUT:-/tmp/out}
STEPS=${STEPS:-varlen tune-decode decode-graphs integrations host decode}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG=$OUT/bench.log
step() {  # name seconds command...
  local name=$1 limit=$2
  shift 2
  echo "== $name" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -25
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}
has() { [[ " $STEPS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$LOG"
# scikit-build-core reuses build/ incrementally, and a copied tree's timestamps can make stale outputs look current.
rm -rf build
FA2RT_ARCHS=sm90 python3 -m pip install -q --no-build-isolation --no-deps . >>"$LOG" 2>&1 || exit 1
cd /tmp || exit 1  # the installed fa2rt, not the tree's python/ folder
ROOT=$OLDPWD
has varlen && step varlen 150 python3 -m fa2rt.bench --varlen --out "$OUT/varlen-h200.json"
has tune-decode && step tune-decode 120 python3 "$ROOT/backends/kernels/tune.py" --op decode --archs sm90 \
  --buckets 64,128 --out "$OUT" --jobs 16
has decode-graphs && step decode-graphs 120 python3 -m fa2rt.bench --decode --decode-graphs \
  --decode-layouts contiguous --out "$OUT/decode-graphs-h200.json"
has integrations && step integrations 100 python3 "$ROOT/ci/bench_integrations.py" --out "$OUT/integrations-h200.json"
has host && step host 40 python3 "$ROOT/ci/host_overhead.py"
has host && step host-decode 40 python3 "$ROOT/ci/host_overhead.py" --decode
has routing-tests && step routing-tests 90 python3 -m pytest -q -p no:cacheprovider "$ROOT/tests/gpu/test_routing_gpu.py"
TABLE=$(python3 -c "import fa2rt.routing as r; print(r.ROUTING_FILE)")
has routing && step routing 420 python3 -m fa2rt.bench --routing --warmup-ms 10 --rep-ms 40 \
  --write-routing "$TABLE" --out "$OUT/routing-h200.json" && cp "$TABLE" "$OUT/routing.json"
has routing-check && step routing-check 200 python3 -m fa2rt.bench --routing --dtype bfloat16 --warmup-ms 10 \
  --rep-ms 50 --routing-rounds 2 --out "$OUT/routing-check-h200.json"
has read-ceiling && step read-ceiling 240 python3 "$ROOT/ci/read_ceiling.py" --out "$OUT/read-ceiling-h200.json"
has decode && step decode 200 python3 -m fa2rt.bench --decode --rep-ms 50 --out "$OUT/decode-h200.json"
exit 0
