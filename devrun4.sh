set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; export PYTHONUNBUFFERED=1
t0=$(date +%s); el() { echo "$1 rc $2 at $(( $(date +%s)-t0 ))s"; }
rm -rf build; FA2RT_ARCHS=sm80,sm89,sm90 python3 -m pip install -v --no-build-isolation --no-deps . > $OUT/build.log 2>&1; el build $?
grep -E "FAILED|stack_bytes" $OUT/build.log | head -5
timeout 150 python3 -m pytest tests/gpu/test_paged_prefill_gpu.py tests/gpu/test_varlen_gpu.py tests/gpu/test_kvcache_gpu.py -q -p no:cacheprovider > $OUT/gpu-tests.log 2>&1; el gpu-tests $?
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 python3 ci/memcheck_varlen.py > $OUT/memcheck-varlen.log 2>&1; el memcheck-varlen $?
for args in "--decode --batch 1" "--decode --batch 8"; do
  timeout 40 python3 ci/host_overhead.py $args 2>&1 | grep -E "^(fa2rt|sdpa|torch|NVIDIA)" >> $OUT/host.txt; el "host $args" $?
done
timeout 100 python3 -m fa2rt.bench --decode --out $OUT/decode-h200.json > $OUT/decode.txt 2>&1; el decode $?
timeout 150 python3 -m fa2rt.bench --varlen --out $OUT/varlen-h200.json > $OUT/varlen.txt 2>&1; el varlen $?
echo ====; tail -3 $OUT/gpu-tests.log; grep -E "^(FAILED|ERROR)" $OUT/gpu-tests.log | head; tail -3 $OUT/memcheck-varlen.log; cat $OUT/host.txt; tail -6 $OUT/decode.txt; tail -40 $OUT/varlen.txt
