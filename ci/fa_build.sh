#!/usr/bin/env bash
# flash-attn on the GPU machine (no network there): build it from the sdist carried in
# .device-cache/ (see ../shared/DEVICE.md), in the background so other work can run.
# Only FA2 can be built so: the sdist carries hopper/'s Python files but not FA3's CUDA
# sources.
#   bash ci/fa_build.sh start        start the build unless flash_attn already imports
#   bash ci/fa_build.sh wait SECONDS wait for it; exit 1 (log tail) if not ready in time
# The build log is /tmp/fa-build.log. JOBS (default 16) and NICE (default 0) tune it.
set -uo pipefail
cd "$(dirname "$0")/.."
ready() { python3 -c "import flash_attn" 2>/dev/null; }
case "${1:-}" in
  start)
    if ready; then echo "flash-attn already installed"; exit 0; fi
    if pgrep -f "pip install.*flash_attn-" >/dev/null; then echo "build already running"; exit 0; fi
    src=$(ls .device-cache/flash_attn-*.tar.gz 2>/dev/null | head -1)
    if [ -z "$src" ]; then echo "no flash-attn sdist in .device-cache/: not building it"; exit 1; fi
    echo "starting flash-attn build from $src ($(date +%T))"
    FLASH_ATTN_CUDA_ARCHS=90 MAX_JOBS=${JOBS:-16} NVCC_THREADS=2 setsid nohup \
      nice -n "${NICE:-0}" python3 -m pip install --no-deps --no-build-isolation "$src" \
      > /tmp/fa-build.log 2>&1 < /dev/null &
    ;;
  wait)
    deadline=$(( $(date +%s) + ${2:-300} ))
    until ready; do
      if [ "$(date +%s)" -ge "$deadline" ] || ! pgrep -f "pip install.*flash_attn-" >/dev/null; then
        ready && break  # it may have finished during the last check
        echo "flash-attn not ready ($(date +%T)); build log tail:"
        tail -4 /tmp/fa-build.log 2>/dev/null
        exit 1
      fi
      sleep 5
    done
    python3 -c "import flash_attn; print('flash-attn', flash_attn.__version__, 'ready')"
    ;;
  *) echo "usage: $0 start | wait SECONDS" >&2; exit 2 ;;
esac
