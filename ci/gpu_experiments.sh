#!/usr/bin/env bash
# One device call: kernel experiments (benchmarks/kernel_experiments.py) compiled in
# parallel processes, then timed serially; meanwhile a GPU test subset (TESTS_K, a pytest
# -k expression over TEST_FILES) in SHARDS processes. Everything under "$OUT" as one tar.
#   OUT=/dir TESTS_K="..." bash ci/gpu_experiments.sh [CASE_SUBSTRING ...]
# env: SHARDS (6), COMPILERS (6), TEST_TIMEOUT (300), TIME_LIMIT (240: the timed run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; LOGS=$(mktemp -d)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null || echo unknown)
echo "GPU: $GPU  $(date -Is)"; T0=$(date +%s)
pids=()
if [ -n "${TESTS_K:-}" ]; then
  SHARDS=${SHARDS:-6}
  for i in $(seq 0 $((SHARDS - 1))); do
    PORTATTN_TEST_SHARD=$i/$SHARDS timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m gpu \
      ${TEST_FILES:-tests/gpu/test_triton_unified_gpu.py tests/gpu/test_kernels_quant_diffkv_gpu.py} \
      -k "$TESTS_K" -q -p no:cacheprovider > "$LOGS/tests-$i.log" 2>&1 &
    pids+=($!)
  done
fi
COMPILERS=${COMPILERS:-6}
for i in $(seq 0 $((COMPILERS - 1))); do
  timeout 300 python3 benchmarks/kernel_experiments.py --compile-only $i/$COMPILERS "$@" \
    > "$LOGS/compile-$i.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
echo "tests + compile: $(( $(date +%s) - T0 ))s"
for i in $(seq 0 $((${SHARDS:-6} - 1))); do
  [ -f "$LOGS/tests-$i.log" ] && { echo "=== shard $i"; cat "$LOGS/tests-$i.log"; }
done > "$LOGS/gpu-tests.log"
grep -hE "passed|failed|error" "$LOGS"/tests-*.log 2>/dev/null | grep -vE "^(FAILED|PASSED|ERROR)" | tail -n 12
grep -h "^FAILED\|^ERROR" "$LOGS"/tests-*.log 2>/dev/null | head -30
cat "$LOGS"/compile-*.log | head -40
timeout ${TIME_LIMIT:-240} python3 benchmarks/kernel_experiments.py "$@" > "$LOGS/experiments.log" 2>&1
echo "experiments rc=$?"
grep -E " us$|Error|error" "$LOGS/experiments.log" | grep -v '^ ' | head -n 100
grep -E "copy_tbs" "$LOGS/experiments.log"
tar -czf "$OUT/experiments.tgz" -C "$LOGS" .
echo "total $(( $(date +%s) - T0 ))s"
