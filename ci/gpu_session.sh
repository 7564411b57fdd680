#!/usr/bin/env bash
# One device call: start the flash-attn build in the background (when its source is
# carried in .device-cache/), then the capability report twice (ci/results), the whole GPU
# test tier, the dispatch-overhead benchmark and the demo. Everything lands in "$OUT".
#   OUT=/dir bash ci/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_session_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
JOBS=12 NICE=10 bash ci/fa_build.sh start  # when its sdist is carried in .device-cache/
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv,noheader
OUT="$OUT/probe" bash ci/gpu_probe.sh 2>&1 | tail -8
SHARDS=6; pids=()
for i in $(seq 0 $((SHARDS - 1))); do
  PORTATTN_TEST_SHARD=$i/$SHARDS timeout 400 python3 -m pytest -m gpu tests/gpu -q \
    -p no:cacheprovider > /tmp/gpu-tests-$i.log 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done  # not the flash-attn build
for i in $(seq 0 $((SHARDS - 1))); do echo "=== shard $i"; cat /tmp/gpu-tests-$i.log; done > "$OUT/gpu-tests.log"
echo "GPU tier:"; grep -hE "^[0-9]+ (passed|failed)|passed|failed" /tmp/gpu-tests-*.log | grep -vE "^(FAILED|PASSED)" | tail -6
grep -h "^FAILED" /tmp/gpu-tests-*.log | head -20
python3 benchmarks/dispatch_overhead.py | tee "$OUT/dispatch-overhead.json"
python3 -m portattn demo 2>&1 | tee "$OUT/demo.txt" | tail -4
tail -3 /tmp/fa-build.log 2>/dev/null
