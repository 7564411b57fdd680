#!/usr/bin/env bash
# Issue 17 on a 2-GPU machine (kind nvidia-h200-x2): several GPUs in one process and
# under torch.distributed. The multi-GPU tests (cuda:1 while cuda:0 is current, both GPUs
# from one process, mixed devices, the probe and report per GPU, the torchrun example as
# a subprocess), then the example by itself, then the report of both GPUs.
#   OUT=/dir bash ci/gpu_multi.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_multi_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
unset TRITON_INTERPRET
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader \
  | tee "$OUT/gpus.txt"
nvidia-smi topo -m > "$OUT/topology.txt" 2>&1
timeout 540 python3 -m pytest -m gpu tests/gpu/test_multi_gpu.py -q -rs -p no:cacheprovider \
  > "$OUT/multi-gpu-tests.log" 2>&1
echo "tests:"; grep -E "passed|failed|error|skipped" "$OUT/multi-gpu-tests.log" | tail -3
grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/multi-gpu-tests.log" | head -20
timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
  examples/tensor_parallel.py > "$OUT/tensor-parallel.jsonl" 2> "$OUT/tensor-parallel.err"
echo "example (torchrun): rc=$?"; cat "$OUT/tensor-parallel.jsonl"
timeout 300 python3 examples/tensor_parallel.py --spawn 2 --dtype bf16 \
  > "$OUT/tensor-parallel-spawn-bf16.jsonl" 2> "$OUT/tensor-parallel-spawn-bf16.err"
echo "example (spawn, bf16): rc=$?"; cat "$OUT/tensor-parallel-spawn-bf16.jsonl"
timeout 300 python3 -m portattn report --json > "$OUT/report.json" 2> "$OUT/report.err"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); \
print('report devices:', [(d['device_index'], d['device_name']) for d in r['devices']])" \
  "$OUT/report.json"
