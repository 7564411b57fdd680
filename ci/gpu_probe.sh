#!/usr/bin/env bash
# Probe a real GPU machine twice and show that the second run came from the disk cache.
#
#   OUT=/some/dir bash ci/gpu_probe.sh        (run from anywhere; OUT defaults to ./gpu_probe_out)
#
# Writes to "$OUT":
#   report-1.json   first `python -m portattn report --json` (probe_origin "probed")
#   report-2.json   second run, a new process (probe_origin "disk-cache")
#   report.txt      the text report (third run, also from the cache)
#   capabilities-cache.json   the disk-cache file the runs shared
#   summary.txt     timings of both runs and the checks below
# Exits non-zero when the first run was not a fresh probe, the second did not come from the
# cache, or the two disagree. A fresh cache directory is used, never the user's own.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_probe_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PORTATTN_CACHE_DIR="$(mktemp -d)"
unset PORTATTN_NO_DISK_CACHE PORTATTN_SIMULATE TRITON_INTERPRET

now() { date +%s.%N; }

t0=$(now)
"$PY" -m portattn report --json >"$OUT/report-1.json"
t1=$(now)
"$PY" -m portattn report --json >"$OUT/report-2.json"
t2=$(now)
"$PY" -m portattn report >"$OUT/report.txt"
cp "$PORTATTN_CACHE_DIR"/capabilities-*.json "$OUT/capabilities-cache.json"
trap 'rm -rf "$PORTATTN_CACHE_DIR"' EXIT

"$PY" - "$OUT" "$t0" "$t1" "$t2" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
out, t0, t1, t2 = sys.argv[1], *map(float, sys.argv[2:])
first = json.load(open(f"{out}/report-1.json"))
second = json.load(open(f"{out}/report-2.json"))
caps = first["capabilities"]
print(f"device: {caps['device_name']} ({caps['arch']}, {caps['sm_count']} SMs), "
      f"torch {caps['torch_version']}, Triton {caps['triton_version']}")
for name in ("triton", "triton_kernels", "tensor_descriptors", "flash_attn"):
    check = caps[name]
    print(f"  {name:<19} {'yes' if check['ok'] else 'no ':<4} {check['reason']}")
print(f"run 1: probe_origin={first['probe_origin']:<11} {t1 - t0:6.2f} s")
print(f"run 2: probe_origin={second['probe_origin']:<11} {t2 - t1:6.2f} s")
problems = []
if first["probe_origin"] != "probed":
    problems.append("the first run did not probe")
if second["probe_origin"] != "disk-cache":
    problems.append("the second run did not come from the disk cache")
if second["capabilities"] != caps:
    problems.append("the two runs disagree")
print("OK: the second run came from the disk cache" if not problems else
      "FAILED: " + "; ".join(problems))
sys.exit(1 if problems else 0)
EOF
