#!/usr/bin/env bash
# FA4 (flash_attn.cute, pip flash-attn-4) on the GPU machine, right after installing it
# (../shared/DEVICE.md): two device calls back to back,
#   call 1, carry [".fa4-part1"]:  bash .fa4-part1/install.sh
#   call 2, carry [".fa4-part2"]:  bash .fa4-part2/install.sh && bash ci/gpu_fa4.sh
#
# Stages (each skipped, not killed, when too little of the call is left; CALL_SECONDS is
# this script's share of the 600 s call, default 480 for ~2 min of install before it):
#   tests   the FA4 GPU tier in SHARDS pytest processes (PORTATTN_TEST_SHARD), with the FA2
#           and FA3 files (they must skip with a reason here) and the FA4 CPU tests; at the
#           same time `portattn report --json` (probed here) and a compile-only pass of our
#           Triton kernels for the bench's cases at both block sizes
#   bench16, bench128
#           `portattn.bench --cases $BENCH_CASES` (default plain,diffkv: every PERFORMANCE.md
#           shape in bf16, and the DiffKV 192/128 cases) at block 16 then 128: ours, SDPA
#           cuDNN/flash, portattn's flash_attn backend (FA4 here) and fa4_paged (FA4 called
#           directly on our paged cache; on the DiffKV cases the only peer)
# Into $OUT (at most 8 files come back): report-fa4.json, <gpu>-<date>-fa4-b16.json and
# -b128.json (+ .png when matplotlib is there), summary.txt, fa4-logs.tar.gz (every log).
# Prints ci/fa4_summary.py's table last: tests, ours vs FA4 per case, verdict per class.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-gpu_fa4_out}; mkdir -p "$OUT"
LOGS=$(mktemp -d)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
export PORTATTN_CACHE_DIR=${PORTATTN_CACHE_DIR:-$(mktemp -d)}  # a fresh probe, shared
LIMIT=${CALL_SECONDS:-480}
SHARDS=${SHARDS:-4}
BENCH_CASES=${BENCH_CASES:-plain,diffkv}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ','').split()[0].lower())" 2>/dev/null || echo gpu)
TAG="$GPU-$(date +%F)"
python3 - <<'EOF' 2>&1 | tee "$LOGS/versions.log"
import importlib.metadata as md, torch
print("GPU", torch.cuda.get_device_name(), "cc", torch.cuda.get_device_capability(),
      "torch", torch.__version__)
for dist in ("flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels", "apache-tvm-ffi", "triton"):
    try:
        print(dist, md.version(dist))
    except Exception as exc:
        print(dist, "missing:", exc)
EOF

# ---- tests, with the report and the Triton warm-up alongside
pids=()
TESTS_SECONDS=$(( $(left) - 200 )); [ "$TESTS_SECONDS" -lt 60 ] && TESTS_SECONDS=60
for i in $(seq 0 $((SHARDS - 1))); do
  OMP_NUM_THREADS=3 PORTATTN_TEST_SHARD=$i/$SHARDS timeout "$TESTS_SECONDS" \
    python3 -m pytest -m gpu tests/gpu/test_flash_attn4_gpu.py tests/gpu/test_flash_attn_gpu.py \
    tests/gpu/test_flash_attn3_gpu.py -q -rs -p no:cacheprovider \
    > "$LOGS/tests-gpu-$i.log" 2>&1 &
  pids+=($!)
done
OMP_NUM_THREADS=2 timeout 120 python3 -m pytest tests/test_flash_attn4.py -q -p no:cacheprovider \
  > "$LOGS/tests-cpu-tier-fa4.log" 2>&1 &
pids+=($!)
timeout 150 python3 -m portattn report --json > "$OUT/report-fa4.json" 2> "$LOGS/report.err" &
pids+=($!)
for bs in ${BLOCK_SIZES:-16 128}; do
  for i in 0 1; do
    timeout 200 python3 -m portattn.bench --compile-only --shrink 4 --cases "$BENCH_CASES" \
      --block-size "$bs" --shard $i/2 > "$LOGS/compile-b$bs-$i.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p"; done
echo "[tests done at $(( $(date +%s) - T0 ))s]"
grep -hE "[0-9]+ (passed|failed|skipped)" "$LOGS"/tests-*.log | tail -$((SHARDS + 1))
grep -h "^FAILED\|^ERROR" "$LOGS"/tests-*.log | head -20
python3 - "$OUT/report-fa4.json" <<'EOF' || echo "report: not readable (see report.err)"
import json, sys
r = json.load(open(sys.argv[1]))
c = r["capabilities"]
print("report: flash_attn", c["flash_attn"]["ok"], "-", c["flash_attn"]["reason"],
      "| interfaces", c["flash_attn_interfaces"])
for row in r["routing"]:
    print(f"  {row['problem']:<40} {row['backend']:<16} {row['variant'][:60]}")
EOF

# ---- benchmarks (nothing else on the GPU now; WAIT_FOR: a pattern of processes started
# earlier on this machine, e.g. another tier, to let finish first)
if [ -n "${WAIT_FOR:-}" ]; then
  while pgrep -f "$WAIT_FOR" > /dev/null && [ "$(left)" -gt 120 ]; do sleep 2; done
  echo "[benches start at $(( $(date +%s) - T0 ))s]"
fi
BLOCK_SIZES=${BLOCK_SIZES:-16 128}
stages=$(echo $BLOCK_SIZES | wc -w)  # each bench gets an equal share of what is left
for bs in $BLOCK_SIZES; do
  share=$(( ($(left) - 15) / stages )); stages=$((stages - 1))
  if [ "$share" -lt ${MIN_BENCH_SECONDS:-90} ]; then echo "skipped bench at block $bs: $(left)s left"; continue; fi
  timeout "$share" python3 -m portattn.bench --cases "$BENCH_CASES" --block-size "$bs" \
    --rep "${BENCH_REP:-100}" --out "$OUT" --prefix "$TAG-fa4-b$bs" > "$LOGS/bench-b$bs.log" 2>&1
  echo "bench block $bs: rc=$? (limit ${share}s) at $(( $(date +%s) - T0 ))s"
done

cp "$LOGS"/tests-*.log "$OUT"/ 2>/dev/null
python3 ci/fa4_summary.py "$OUT" > /dev/null
rm -f "$OUT"/tests-*.log
tar -C "$LOGS" -czf "$OUT/fa4-logs.tar.gz" .
echo "[gpu_fa4.sh done at $(( $(date +%s) - T0 ))s; files: $(ls "$OUT" | tr '\n' ' ')]"
echo
cat "$OUT/summary.txt"
