"""GPU tier, two GPUs (issue 17): portattn on ``cuda:1`` while ``cuda:0`` is current, one
process driving both GPUs, mixed devices rejected, and the torch.distributed example.

Run on a 2-GPU machine: ``bash ci/gpu_multi.sh`` (or ``pytest -m gpu
tests/gpu/test_multi_gpu.py``). Every test skips, with the reason, on fewer GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import portattn
from portattn import InputError, planning
from portattn.testing import dense_attention, make_paged_batch, relative_error

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
CASES = {  # query lens, seq lens
    "decode": ([1] * 8, [700 + 97 * i for i in range(8)]),
    "long-decode": ([1, 1], [6000, 1700]),  # split-KV: the workspace of cuda:1's runner
    "mixed": ([1, 40, 3], [900, 300, 2000]),
}
BACKENDS = [None, "triton_unified", "torch_ref"]


@pytest.fixture
def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    planning.clear()
    yield
    planning.clear()


def _batch(device, case="mixed", dtype=torch.float16, seed=0):
    query_lens, seq_lens = CASES[case]
    return make_paged_batch(query_lens, seq_lens, num_q_heads=8, num_kv_heads=2,
                            head_size=128, dtype=dtype, device=device, seed=seed)


def _expected(batch):
    return dense_attention(batch.q.cpu(), batch.keys, batch.values, batch.query_lens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda1_while_cuda0_is_current(two_gpus, case, backend):
    with torch.cuda.device(0):
        batch = _batch("cuda:1", case)  # the cache write launches on cuda:1 too
        expected = _expected(batch)
        for call in range(3):  # first call, memo, recorded relaunch
            out = portattn.attention(batch.q, batch.cache, batch.metadata, backend=backend)
            assert out.device == torch.device("cuda:1")
            assert relative_error(out, expected) < 5e-3, f"call {call}"
            assert torch.cuda.current_device() == 0  # left as it was


def test_plan_made_on_cuda1_runs_whatever_device_is_current(two_gpus):
    batch = _batch("cuda:1", "long-decode")
    expected = _expected(batch)
    plan = portattn.plan(batch.metadata, num_q_heads=8, dtype=torch.float16,
                         cache=batch.cache)
    for current in (0, 1, 0, 1):
        with torch.cuda.device(current):
            out = plan.run(batch.q, batch.cache)
            assert relative_error(out, expected) < 5e-3, f"current cuda:{current}"


def test_both_gpus_from_one_process(two_gpus):
    """The same problem on both GPUs, interleaved: no cache serves one GPU's answer (or
    workspace, or compiled kernel) to the other."""
    batches = [_batch(f"cuda:{i}", "long-decode", seed=i) for i in (0, 1)]
    expected = [_expected(b) for b in batches]
    for _ in range(3):
        for batch, want in zip(batches, expected):
            out = portattn.attention(batch.q, batch.cache, batch.metadata)
            assert out.device == batch.q.device
            assert relative_error(out, want) < 5e-3
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)


def test_a_call_on_cuda1_never_waits_for_cuda0(two_gpus):
    """cuda:0 busy (a spin kernel on its stream) while calls run on cuda:1: when they
    return, cuda:0's work is still running, so nothing synchronized with cuda:0."""
    batch = _batch("cuda:1", "long-decode")
    expected = _expected(batch)
    portattn.attention(batch.q, batch.cache, batch.metadata)  # compile, probe, plan
    torch.cuda.synchronize(1)
    with torch.cuda.device(0):
        torch.cuda._sleep(2_000_000_000)  # about a second of spinning on cuda:0
        busy = torch.cuda.current_stream(0)
        outs = [portattn.attention(batch.q, batch.cache, batch.metadata) for _ in range(5)]
        still_busy = not busy.query()
    torch.cuda.synchronize(1)
    assert still_busy, "a call on cuda:1 waited for cuda:0"
    for out in outs:
        assert relative_error(out, expected) < 5e-3
    torch.cuda.synchronize(0)


def test_probe_describes_each_gpu(two_gpus):
    for index in (0, 1):
        caps = portattn.probe(device=f"cuda:{index}")
        assert caps.device_index == index
        assert caps.device_name == torch.cuda.get_device_name(index)
        assert caps.sm_count == torch.cuda.get_device_properties(index).multi_processor_count
    first, second = portattn.probe(device=0), portattn.probe(device=1)
    if first.arch == second.arch:  # the test kernels ran on each GPU (a child per GPU)
        assert second.triton_kernels.ok == first.triton_kernels.ok, second.triton_kernels
        assert second.tensor_descriptors.ok == first.tensor_descriptors.ok, \
            second.tensor_descriptors
    with torch.cuda.device(1):
        assert portattn.probe().device_index == 1
    batch = _batch("cuda:1")
    with torch.cuda.device(0):
        decision = portattn.explain(batch.q, batch.cache, batch.metadata)
    assert decision.arch == portattn.probe(device=1).arch


def test_report_lists_every_gpu(two_gpus):
    from portattn.capabilities import collect_report

    report = collect_report()
    assert [d["device_index"] for d in report["devices"]] == \
        list(range(torch.cuda.device_count()))


@pytest.mark.parametrize("part", ["cache", "metadata", "out", "sinks"])
def test_mixed_devices_raise_input_error(two_gpus, part):
    batch = _batch("cuda:1")
    on0 = _batch("cuda:0")
    q, cache, metadata, kwargs = batch.q, batch.cache, batch.metadata, {}
    if part == "cache":
        cache = on0.cache
    elif part == "metadata":
        metadata = on0.metadata
    elif part == "out":
        kwargs["out"] = torch.empty(q.shape[0], 8, 128, dtype=q.dtype, device="cuda:0")
    else:
        kwargs["sinks"] = torch.zeros(8, device="cuda:0")
    with pytest.raises(InputError) as info:
        portattn.attention(q, cache, metadata, **kwargs)
    assert "cuda:0" in str(info.value) and "cuda:1" in str(info.value)
    if part == "metadata":
        assert info.value.argument.startswith("metadata.")
    elif part != "cache":
        assert info.value.argument == part


def test_plan_run_with_q_on_another_gpu(two_gpus):
    batch = _batch("cuda:0")
    plan = portattn.plan(batch.metadata, num_q_heads=8, dtype=torch.float16,
                         cache=batch.cache)
    with pytest.raises(InputError) as info:
        plan.run(batch.q.to("cuda:1"), batch.cache)
    assert info.value.argument == "q"


def test_tensor_parallel_example(two_gpus):
    if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
        pytest.skip("torch.distributed with NCCL is not available")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"),
                                                      os.environ.get("PYTHONPATH")) if p))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", str(ROOT / "examples" / "tensor_parallel.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()
               if line.startswith("{")]
    assert len(results) == 1 and results[0]["result"] == "PASS", proc.stdout
    assert results[0]["world_size"] == 2
