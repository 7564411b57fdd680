#!/usr/bin/env bash
# One device call that re-verifies a kernel change end to end when little device time is
# left: a GPU test subset (split-KV / DiffKV / plans / API), then the kernel experiments,
# the bench (peers on), a sweep, the block-128 prefill bench (descriptor loads), host
# overhead and descriptor-vs-pointer timings. Each stage has its own time limit so the
# call stays under the 600 s device limit. Everything lands in $OUT/verify.tgz (+ a
# summary on stdout).
#   OUT=/dir TESTS_K="3d or diffkv" bash ci/gpu_verify.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_verify_out}; mkdir -p "$OUT"
W=$(mktemp -d)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
T0=$(date +%s)
CALL=${CALL_SECONDS:-575}
stamp() { echo "[$1 at $(( $(date +%s) - T0 ))s]"; }
# a stage's time limit: its own, or what is left of the call minus 25 s (the tar at the end)
lim() { local l=$(( CALL - ($(date +%s) - T0) - 25 )); [ "$l" -lt 5 ] && l=5; echo $(( l < $1 ? l : $1 )); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
SHARDS=${SHARDS:-12}
for i in $(seq 0 $((SHARDS - 1))); do
  PORTATTN_TEST_SHARD=$i/$SHARDS timeout $(lim ${TEST_TIMEOUT:-220}) python3 -m pytest -m gpu \
    tests/gpu/test_triton_unified_gpu.py tests/gpu/test_kernels_quant_diffkv_gpu.py \
    tests/gpu/test_plan_gpu.py tests/gpu/test_api_gpu.py -k "${TESTS_K:-3d or diffkv or plan or api}" \
    -q -p no:cacheprovider > "$W/tests-$i.log" 2>&1 &
done
for i in 0 1; do  # the bench's kernels into Triton's disk cache meanwhile
  timeout $(lim 200) python3 -m portattn.bench --compile-only --shrink 4 --shard $i/2 \
    --cases decode-plain,spec-plain,prefill-1x8192,quant,diffkv > "$W/compile-$i.log" 2>&1 &
done
timeout $(lim 200) python3 -m portattn.bench --compile-only --shrink 4 --block-size 128 \
  --cases prefill-plain,mixed-plain > "$W/compile-b128.log" 2>&1 &
timeout $(lim 200) python3 -m portattn.bench --compile-only --sweep --shrink 4 \
  --cases decode-8x8192-diffkv > "$W/compile-sweep.log" 2>&1 &
wait
cat "$W"/tests-*.log > "$W/gpu-tests.log"
stamp tests; cat "$W"/tests-*.log | grep -oE "[0-9]+ (passed|failed|errors?)" \
  | awk '{n[$2]+=$1} END {for (k in n) printf "%s %d  ", k, n[k]; print ""}'
for f in "$W"/tests-*.log; do  # a shard stopped by its time limit prints no summary
  grep -qE "[0-9]+ (passed|failed|errors?)" "$f" || echo "$(basename "$f"): cut short, $(grep -o "[.FE]" "$f" | sort | uniq -c | tr '\n' ' ')"
done
grep -h "^FAILED\|^ERROR" "$W"/tests-*.log | head -20
PYTHONPATH=$PWD/src:$PWD/.gpu timeout $(lim 100) python3 benchmarks/kernel_experiments.py > "$W/kexp.log" 2>&1
stamp experiments; grep -E " us |error" "$W/kexp.log" | grep -v '"' | tail -40
timeout $(lim 130) python3 -m portattn.bench --cases decode-plain,spec-plain,prefill-1x8192,quant,diffkv \
  --rep 60 --out "$W" --prefix h200-verify-b16 > "$W/bench-b16.log" 2>&1
stamp bench16; sed -n '/^GPU NVIDIA/,$p' "$W/bench-b16.log"
timeout $(lim 50) python3 -m portattn.bench --cases decode-8x8192-diffkv,decode-32x8192-diffkv,decode-128x8192-diffkv \
  --sweep --no-peers --rep 40 --out "$W" --prefix h200-verify-diffkv-sweep > "$W/sweep.log" 2>&1
stamp sweep
timeout $(lim 70) python3 -m portattn.bench --cases prefill-plain,mixed-plain --block-size 128 --rep 60 \
  --out "$W" --prefix h200-verify-b128 > "$W/bench-b128.log" 2>&1
stamp bench128; sed -n '/^GPU NVIDIA/,$p' "$W/bench-b128.log" | head -12
timeout $(lim 50) python3 benchmarks/dispatch_overhead.py --out "$W/dispatch-overhead.json" \
  2> "$W/dispatch-overhead.txt" > /dev/null
stamp dispatch; cat "$W/dispatch-overhead.txt"
if [ "$(lim 1000)" -gt 20 ]; then
  timeout $(lim 1000) python3 benchmarks/td_compare.py --block-sizes 128 \
    --cases decode-32x8192-fp8,decode-32x8192-fp8pth,decode-32x8192-int8pth,prefill-1x8192-fp8,decode-8x8192-diffkv,prefill-1x4096,decode-1x32768,spec-16x4096x4,decode-8x1024 \
    --out "$W/td.jsonl" > "$W/td.log" 2>&1
  timeout $(lim 1000) python3 benchmarks/td_compare.py \
    --block-sizes 64,16 --cases prefill-1x8192,prefill-4x2048,mixed-2048+63x4096,decode-32x8192,prefill-1x4096 \
    --out "$W/td.jsonl" >> "$W/td.log" 2>&1
fi
stamp td; python3 - "$W/td.log" <<'EOP'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        print(r["case"], r["block_size"], r["variant"], round(r.get("us", 0), 1),
              r.get("max_abs_diff_vs_pointer"), r.get("error", "")[:80])
EOP
tar -C "$W" -czf "$OUT/verify.tgz" .
stamp done
