#!/usr/bin/env bash
# throwaway device script (not committed)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1
t0=$(date +%s)
el() { echo "$1 rc $2 at $(( $(date +%s)-t0 ))s"; }
rm -rf build
FA2RT_ARCHS=sm80,sm89,sm90 python3 -m pip install -v --no-build-isolation --no-deps . > $OUT/build.log 2>&1; el build $?
for args in "--decode --batch 1" "--decode --batch 8" "--decode --batch 64 --seqlen 32768"; do
  timeout 60 python3 ci/host_overhead.py $args 2>&1 | grep -v Warn | grep -v "return F" >> $OUT/host.txt; el "host $args" $?
done
timeout 200 python3 -m fa2rt.bench --varlen --out $OUT/varlen-h200.json > $OUT/varlen.txt 2>&1; el varlen $?
timeout 200 python3 -m fa2rt.bench --decode --out $OUT/decode-h200.json > $OUT/decode.txt 2>&1; el decode $?
echo =====; cat $OUT/host.txt; tail -45 $OUT/varlen.txt; tail -30 $OUT/decode.txt
