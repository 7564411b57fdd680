#!/usr/bin/env bash
# Second device call, right after ci/gpu_session.sh: wait for the flash-attn build, then
# the flash-attn GPU tier, the report (flash-attn now probed) and the benchmark with
# portattn's flash-attn backends beside our Triton kernels (block 16 and block 256).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_fa_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${FA_WAIT:-330} ))
until python3 -c "import flash_attn" 2>/dev/null; do
  if [ "$(date +%s)" -gt "$deadline" ] || ! pgrep -f "pip install" >/dev/null; then
    echo "flash-attn not ready"; tail -20 /tmp/fa-build.log; exit 1
  fi
  sleep 10
done
python3 -c "import flash_attn; print('flash-attn', flash_attn.__version__)"
cp /tmp/fa-build.log "$OUT/fa-build.log" 2>/dev/null
timeout 200 python3 -m pytest -m gpu tests/gpu/test_flash_attn_gpu.py -q -p no:cacheprovider \
  2>&1 | tee "$OUT/fa-tests.log" | tail -8
PORTATTN_CACHE_DIR=$(mktemp -d) python3 -m portattn report --json > "$OUT/report-fa.json"
python3 -m portattn report | grep -A12 "^Backends" | head -14
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ','').split()[0].lower())")
for bs in 16 256; do
  timeout 150 python3 -m portattn bench --cases decode-32x8192,decode-1x8192,prefill-1x8192 \
    --block-size $bs --rep 50 --out "$OUT" --prefix "$GPU-$(date +%F)-fa-b$bs" 2>&1 \
    | tail -6
done
