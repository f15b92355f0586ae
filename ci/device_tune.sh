#!/usr/bin/env bash
# One device call: time candidate tiles (backends/kernels/tune.py) for sm90, and sm80/sm89 through PTX; results to $OUT.
# Only the native module is built (FA2RT_ARCHS empty): tune.py compiles each candidate itself.
set -uo pipefail
FA2RT_ARCHS= python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/fa . 2>&1 | tail -3
export PYTHONPATH=/tmp/fa PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 backends/kernels/tune.py --archs sm90,sm80,sm89 --buckets 64,128,256 --out $OUT --jobs 16 > $OUT/tune.log 2>&1
echo "exit $?"
grep -c tflops $OUT/tune.log; grep -c failed $OUT/tune.log
tail -14 $OUT/tune.log
