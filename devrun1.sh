#!/usr/bin/env bash
# throwaway device script (not committed)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
t0=$(date +%s)
el() { echo "$1 rc $2 at $(( $(date +%s)-t0 ))s"; }
rm -rf build
FA2RT_ARCHS=sm80,sm89,sm90 python3 -m pip install -v --no-build-isolation --no-deps . > $OUT/build.log 2>&1; el build $?
grep -E "FAILED|stack_bytes" $OUT/build.log | head -5
timeout 300 python3 -m pytest tests/gpu -q -p no:cacheprovider --ignore=tests/gpu/test_fuzz_gpu.py --durations=8 > $OUT/gpu-tests.log 2>&1; el gpu-tests $?
for args in "" "--decode --batch 1" "--decode --batch 8" "--decode --batch 64 --seqlen 32768" "--decode --batch 8 --kv-heads 32"; do
  timeout 60 python3 ci/host_overhead.py $args >> $OUT/host.txt 2>&1; el "host $args" $?
done
timeout 200 python3 ci/bench_integrations.py --out $OUT/integrations-h200.json > $OUT/integrations.txt 2>&1; el integrations $?
echo ======; tail -4 $OUT/gpu-tests.log; grep -E "^(FAILED|ERROR)" $OUT/gpu-tests.log | head -20
cat $OUT/host.txt | grep -v "^$"; tail -15 $OUT/integrations.txt
