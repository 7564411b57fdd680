#!/usr/bin/env bash
# The prefill bench with its peers (SDPA cuDNN on contiguous K/V, FA4 paged when installed:
# ../shared/DEVICE.md, ci/gpu_fa4.sh's two calls) at one block size: head 128 (prefill,
# mixed and the fp8 prefill cases), then heads 64 and 256 (plain prefill). JSON into $OUT,
# logs as one tar.   OUT=/dir BLOCK_SIZE=16 bash ci/gpu_prefill_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; LOGS=$(mktemp -d)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
BS=${BLOCK_SIZE:-16}; TAG=${TAG:-h200-$(date +%F)-prefill-b$BS}
T0=$(date +%s)
timeout ${T128:-260} python3 -m portattn.bench --cases prefill,mixed --block-size "$BS" \
  --out "$OUT" --prefix "$TAG-h128" > "$LOGS/bench-h128.log" 2>&1
echo "h128 rc=$? at $(( $(date +%s) - T0 ))s"
for head in 64 256; do
  timeout ${THEAD:-110} python3 -m portattn.bench --cases prefill-plain --block-size "$BS" \
    --head-size $head --out "$OUT" --prefix "$TAG-h$head" > "$LOGS/bench-h$head.log" 2>&1
  echo "h$head rc=$? at $(( $(date +%s) - T0 ))s"
done
rm -f "$OUT"/*.png
tar -C "$LOGS" -czf "$OUT/prefill-bench-logs.tgz" .
for f in "$LOGS"/bench-*.log; do echo "== $f"; grep -vE "^\s*$" "$f" | tail -n 25; done
