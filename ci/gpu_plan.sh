#!/usr/bin/env bash
# Issue 15 on the GPU machine: the plan tier (replay vs the reference, alignment, CUDA
# graphs, streams, syncs, hooks, memory), the API tier, then the dispatch-overhead
# benchmark (host time per call, 1/32/96 layers, eager and planned, JIT vs cheap launch).
#   OUT=/dir bash ci/gpu_plan.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_plan_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv,noheader
timeout 420 python3 -m pytest -m gpu tests/gpu/test_plan_gpu.py tests/gpu/test_api_gpu.py \
  tests/test_fast_launch.py -q -p no:cacheprovider > "$OUT/plan-tests.log" 2>&1
echo "tests:"; grep -E "passed|failed|error" "$OUT/plan-tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/plan-tests.log" | head -20
timeout 420 python3 benchmarks/dispatch_overhead.py --out "$OUT/dispatch-overhead.json" \
  2> "$OUT/dispatch-overhead.txt" > /dev/null
cat "$OUT/dispatch-overhead.txt"
