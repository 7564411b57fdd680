#!/usr/bin/env bash
# Device call A for the kernel work: the whole Triton GPU tier (sharded over processes so
# kernels compile in parallel) while the bench's kernels are compiled into Triton's disk
# cache; call B (sent right after, same machine) runs the bench. Results under "$OUT".
#   OUT=/dir bash ci/gpu_kernels.sh tests|bench [bench cases]
# env: SHARDS, TEST_TIMEOUT, TEST_FILES (default: the unified, quant/DiffKV and API tiers),
# EXTRA_TESTS, COMPILERS, COMPILE_SWEEP_CASES; bench: PEERS=1, BENCH_REP, BENCH_TIMEOUT,
# SWEEP_CASES, SWEEP_TIMEOUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
WHAT=${1:-tests}
CASES=${2:-decode-plain,prefill-1x8192,quant,diffkv}
SWEEP_CASES=${SWEEP_CASES-decode-32x8192,decode-32x8192-fp8,decode-32x8192-int8pth,decode-8x8192-fp8,decode-128x8192-fp8,prefill-1x8192-diffkv,prefill-1x8192-fp8}
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null || echo unknown)
TAG=$(echo "$GPU" | sed 's/NVIDIA //' | awk '{print tolower($1)}')-$(date +%F)
echo "GPU: $GPU  $(date -Is)"; T0=$(date +%s)
if [ "$WHAT" = tests ]; then
  SHARDS=${SHARDS:-12}; pids=()
  for i in $(seq 0 $((SHARDS - 1))); do
    PORTATTN_TEST_SHARD=$i/$SHARDS timeout ${TEST_TIMEOUT:-420} python3 -m pytest -m gpu \
      ${TEST_FILES:-tests/gpu/test_triton_unified_gpu.py tests/gpu/test_kernels_quant_diffkv_gpu.py \
      tests/gpu/test_api_gpu.py} ${EXTRA_TESTS:-} -q -p no:cacheprovider --maxfail=20 \
      > /tmp/gpu-tests-$i.log 2>&1 &
    pids+=($!)
  done
  COMPILERS=${COMPILERS:-4}
  for i in $(seq 0 $((COMPILERS - 1))); do
    timeout 400 python3 -m portattn.bench --compile-only --shrink 4 --cases "$CASES" \
      --shard $i/$COMPILERS > /tmp/compile-$i.log 2>&1 &
    pids+=($!)
  done
  if [ -n "${COMPILE_SWEEP_CASES:-}" ]; then  # the sweep's tiles too (call B times them)
    timeout 400 python3 -m portattn.bench --compile-only --sweep --shrink 4 \
      --cases "$COMPILE_SWEEP_CASES" > /tmp/compile-sweep.log 2>&1 &
    pids+=($!)
  fi
  for p in "${pids[@]}"; do wait "$p"; done
  for i in $(seq 0 $((SHARDS - 1))); do echo "=== shard $i"; cat /tmp/gpu-tests-$i.log; done > "$OUT/gpu-tests.log"
  cat /tmp/compile-*.log > "$OUT/compile.log"
  echo "GPU tier ($(( $(date +%s) - T0 ))s):"
  grep -hE "^[0-9]+ (passed|failed)|passed|failed|error" /tmp/gpu-tests-*.log | grep -vE "^(FAILED|PASSED|ERROR)" || true
  grep -h "^FAILED\|^ERROR" /tmp/gpu-tests-*.log | head -30
else
  # PEERS=1: SDPA cuDNN / flash (and flash-attn when installed) timed beside ours
  timeout ${BENCH_TIMEOUT:-330} python3 -m portattn.bench --cases "$CASES" \
    $([ "${PEERS:-0}" = 1 ] || echo --no-peers) --rep "${BENCH_REP:-100}" \
    --out "$OUT" --prefix "$TAG-kernels-bench" 2>&1 | tee "$OUT/bench.log" | tail -n 60
  if [ -n "$SWEEP_CASES" ]; then
    timeout ${SWEEP_TIMEOUT:-200} python3 -m portattn.bench --cases "$SWEEP_CASES" --sweep \
      --no-peers --out "$OUT" --prefix "$TAG-kernels-sweep" > "$OUT/sweep.log" 2>&1
    python3 - "$OUT/$TAG-kernels-sweep.json" <<'EOP'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["cases"]:
    rows = sorted((x for x in r.get("sweep", []) if "ms" in x), key=lambda x: x["ms"])[:4]
    base = r["impls"]["ours"].get("graph_ms")
    print(r["case"]["name"], "default graph", base and round(base * 1e3, 1), "us; best:",
          [(round(x["ms"] * 1e3, 1), {k: v for k, v in (x["params"].get("short") or x["params"].get("long")).items() if k != "block_q"}) for x in rows[:3]])
EOP
  fi
fi
echo "total $(( $(date +%s) - T0 ))s"
