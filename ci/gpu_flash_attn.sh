#!/usr/bin/env bash
# Device call(s) after ci/gpu_flash_attn_start.sh: wait for the flash-attn build, then the
# stages in STAGES (default "tests bench16 bench256"), each written to "$OUT" as it ends:
#   tests     the flash-attn GPU tier (FA2; the FA3 file skips unless flash_attn_interface
#             imports, which this build never provides) and the report with flash-attn probed
#   bench16   portattn bench, every PERFORMANCE.md case, block 16 (pFA = flash_attn_gather)
#   bench256  the same at block 256 (pFA = flash_attn, paged FA2)
# A stage is skipped when less than STAGE_SECONDS (default 150) of the call are left;
# run the script again with the remaining STAGES. At most 8 files land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-gpu_fa_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
LIMIT=${CALL_SECONDS:-590}
bash ci/fa_build.sh wait "${FA_WAIT:-420}" || exit 1
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ','').split()[0].lower())")
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
for stage in ${STAGES:-tests bench16 bench256}; do
  if [ "$(left)" -lt "${STAGE_SECONDS:-150}" ]; then echo "skipped $stage: $(left)s left"; continue; fi
  case "$stage" in
    tests)
      timeout $(( $(left) - 60 )) python3 -m pytest -m gpu tests/gpu/test_flash_attn_gpu.py \
        tests/gpu/test_flash_attn3_gpu.py -q -p no:cacheprovider -rs 2>&1 \
        | tee "$OUT/fa-tests.log" | tail -6
      PORTATTN_CACHE_DIR=$(mktemp -d) timeout 50 python3 -m portattn report --json \
        > "$OUT/report-fa.json"
      grep -A6 '"backends"' "$OUT/report-fa.json" | head -8 ;;
    bench16|bench256)
      bs=${stage#bench}
      timeout $(( $(left) - 10 )) python3 -m portattn bench --cases all --block-size "$bs" \
        --out "$OUT" --prefix "$GPU-$(date +%F)-fa-b$bs" > "$OUT/bench-b$bs.log" 2>&1
      echo "bench block $bs: rc=$?"; tail -14 "$OUT/bench-b$bs.log" ;;
    *) echo "unknown stage $stage" ;;
  esac
  echo "[$stage done at $(( $(date +%s) - T0 ))s]"
done
