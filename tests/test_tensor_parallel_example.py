"""``examples/tensor_parallel.py`` on the CPU: the head sharding joins back to the whole
layer (in process), and the torch.distributed run passes over gloo with two processes.
The NCCL run on two GPUs is in ``tests/gpu/test_multi_gpu.py``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import portattn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tensor_parallel.py"
SMALL = ["--num-q-heads", "8", "--num-kv-heads", "4", "--head-size", "32",
         "--backend", "torch_ref"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("tensor_parallel_example", EXAMPLE)
    if spec is None or spec.loader is None:
        pytest.skip(f"cannot load {EXAMPLE}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("world", [2, 4])
def test_shards_join_back_to_the_whole_layer(example, world):
    args = example.parse_args(SMALL)
    batch = example.build_batch(args, torch.device("cpu"))
    whole = portattn.attention(batch.q, batch.cache, batch.metadata, backend="torch_ref")
    shards = []
    for rank in range(world):
        q, cache = example.head_shard(batch, rank, world)
        assert q.shape[1] == 8 // world and cache.num_kv_heads == 4 // world
        shards.append(portattn.attention(q, cache, batch.metadata, backend="torch_ref"))
    # the same math per head; fp16 rounding may differ with the batched head count
    torch.testing.assert_close(torch.cat(shards, dim=1), whole, rtol=2e-3, atol=2e-3)


def test_distributed_run_over_gloo_passes():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--spawn", "2", "--device", "cpu",
                           *SMALL], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["result"] for r in results] == ["PASS"] and results[0]["world_size"] == 2
    assert results[0]["heads_per_rank"] == 4


def test_without_torchrun_or_spawn_it_says_how_to_run(example, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    assert example.main([]) == 2
    assert "torchrun" in capsys.readouterr().err
