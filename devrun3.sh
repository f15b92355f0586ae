set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; export PYTHONUNBUFFERED=1
t0=$(date +%s); el() { echo "$1 rc $2 at $(( $(date +%s)-t0 ))s"; }
if ! python3 -c "import fa2rt, sys; sys.exit(0 if fa2rt.capabilities()['build'] else 1)" 2>/dev/null; then rm -rf build; FA2RT_ARCHS=sm80,sm89,sm90 python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; el build $?; fi
for c in fa2rt_varlen sdpa_flash sdpa_efficient sdpa_cudnn torch_varlen padded_flash padded_efficient padded_cudnn; do
  for cz in 0 1; do CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 devrepro.py $c $cz 128 2>&1 | grep -E " ok| ERR" | tee -a $OUT/repro.txt; done
done
el repro 0
timeout 150 python3 devsplits.py > $OUT/splits.txt 2>&1; el splits $?
timeout 60 python3 devprof.py > $OUT/prof.txt 2>&1; el prof $?
cat $OUT/splits.txt | cut -c1-200; head -30 $OUT/prof.txt
