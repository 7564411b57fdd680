#!/usr/bin/env bash
# One script for the GPU machine: GPU test tier, then the benchmark (+ sweep).
#
#   OUT=/some/dir benchmarks/run_gpu.sh [--no-sweep] [--no-tests] [--cases LIST]
#
# Writes under "$OUT": gpu-tests.log, bench.log, <gpu>-<date>-bench.json/.png; prints a short
# table last. Kernel compiles are spread over processes while the tests run (Triton's disk
# cache then serves the timed run), so compiling does not eat the timing budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SWEEP=--sweep; TESTS=1; CASES=all; SHARDS=${SHARDS:-6}
while [ $# -gt 0 ]; do
  case "$1" in
    --no-sweep) SWEEP= ;;
    --no-tests) TESTS=0 ;;
    --cases) CASES=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null || echo unknown)
TAG=$(echo "$GPU" | sed 's/NVIDIA //' | awk '{print tolower($1)}')-$(date +%F)
echo "GPU: $GPU  tag: $TAG  $(date -Is)"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader || true

T0=$(date +%s)
pids=()
if [ "$TESTS" = 1 ]; then
  for i in $(seq 0 $((SHARDS - 1))); do
    PORTATTN_TEST_SHARD=$i/$SHARDS timeout 300 python3 -m pytest -m gpu tests/gpu -q \
      -p no:cacheprovider > /tmp/portattn-tests-$i.log 2>&1 &
    pids+=($!)
  done
fi
for i in $(seq 0 $((SHARDS - 1))); do
  timeout 300 python3 -m portattn.bench --compile-only --shrink 4 --cases "$CASES" $SWEEP \
    --shard $i/$SHARDS > /tmp/portattn-compile-$i.log 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
if [ "$TESTS" = 1 ]; then
  for i in $(seq 0 $((SHARDS - 1))); do
    echo "=== shard $i/$SHARDS"; cat /tmp/portattn-tests-$i.log
  done > "$OUT/gpu-tests.log"
  echo "GPU tests ($(( $(date +%s) - T0 ))s):"
  grep -hE "passed|failed|error" /tmp/portattn-tests-*.log | grep -E "^[=0-9 ]" || true
  grep -h "^FAILED" /tmp/portattn-tests-*.log | head -20 || true
fi
cat /tmp/portattn-compile-*.log | grep -v Warning | tail -n 40 >> "$OUT/gpu-tests.log"
echo "compile warm-up done ($(( $(date +%s) - T0 ))s)"

timeout 420 python3 -m portattn.bench --cases "$CASES" $SWEEP --out "$OUT" \
  --prefix "$TAG-bench" 2>&1 | tee "$OUT/bench.log" | grep -v "^  sweep" | tail -n 40
echo "total $(( $(date +%s) - T0 ))s"
