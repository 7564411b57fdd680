"""Several GPUs in one process, simulated on the CPU (issue 17).

* The probe answers per device: memory cache, disk cache (one file per GPU, keyed by its
  UUID) and ``Capabilities.device_index``; the default is the current device.
* Every cache keyed by capabilities or device keeps one answer per GPU: decisions, plan
  bodies; the call path probes q's device, not the current one.
* A plan launches with its GPU current (the guard only when another one is current).
* Tensors on different GPUs: ``InputError`` naming the argument (fake ``cuda:0`` /
  ``cuda:1`` tensors from ``FakeTensorMode``: shapes and devices without a GPU).
* ``portattn report`` shows a section per GPU and a ``devices`` list in JSON.

The two GPUs are fakes: ``torch.cuda.get_device_properties`` and the probe's device
helpers are monkeypatched; kernel checks are answered without running anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import types

import pytest
import torch

import portattn
from portattn import AttentionMetadata, InputError, PagedKVCache, planning
from portattn.capabilities import (
    clear_cache,
    collect_report,
    last_probe_origin,
    probe,
    render_report,
)
from portattn.capabilities.model import Check
from portattn.capabilities.overrides import OVERRIDES
from portattn.dispatch.problem import Problem
from portattn.dispatch.selector import decide, decision_cache

probe_mod = importlib.import_module("portattn.capabilities.probe")
fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor",
                                  reason="needs torch's FakeTensorMode for fake GPU tensors")

CUDA0, CUDA1 = torch.device("cuda:0"), torch.device("cuda:1")


class TwoGPUs:
    """The fake machine: two sm90 GPUs with distinct names, SM counts and UUIDs."""

    def __init__(self) -> None:
        self.current = 0
        self.uuids = ["uuid-gpu-0", "uuid-gpu-1"]
        self.probed: list[int | None] = []

    def properties(self, index):
        index = torch.device(index).index if not isinstance(index, int) else index
        return types.SimpleNamespace(name=f"Fake H200 #{index}", uuid=self.uuids[index],
                                     major=9, minor=0, multi_processor_count=132 - 4 * index,
                                     total_memory=(141 - index) << 30,
                                     L2_cache_size=50 << 20)


@pytest.fixture
def gpus(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        # fake cuda:0 / cuda:1 tensors reach the real driver's device guard there
        # ("invalid device ordinal" with one GPU); real GPUs: tests/gpu/test_multi_gpu.py
        pytest.skip("the two simulated GPUs need a process that sees no real one")
    # Triton fixes interpreter-or-compiler when a kernel is defined: define ours under this
    # session's setting before TRITON_INTERPRET is removed below, or a run of this file
    # alone would leave them compiled-mode for every later interpreter test
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("portattn.kernels.launch")
        importlib.import_module("portattn.kernels.write_launch")
    for name in ("PORTATTN_SIMULATE", "PORTATTN_NO_DISK_CACHE", "TRITON_INTERPRET",
                 *(o.env_var for o in OVERRIDES)):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PORTATTN_CACHE_DIR", str(tmp_path / "cache"))
    machine = TwoGPUs()
    real_device_facts = probe_mod._device_facts

    def device_facts(index=probe_mod._CURRENT):
        machine.probed.append(index if index is not probe_mod._CURRENT else machine.current)
        return real_device_facts(index)

    monkeypatch.setattr(probe_mod, "_gpu_index", lambda: machine.current)
    monkeypatch.setattr(probe_mod, "_gpu_count", lambda: 2)
    monkeypatch.setattr(probe_mod, "_device_facts", device_facts)
    monkeypatch.setattr(probe_mod, "_driver_version", lambda: "999.1")
    monkeypatch.setattr(probe_mod, "_current_gpu", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(probe_mod, "_kernel_checks", lambda *args: (
        "cuda:90", Check(True, "fake GPU"), Check(True, "fake GPU")))
    monkeypatch.setattr(torch.cuda, "get_device_properties", machine.properties)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    clear_cache()
    decision_cache.clear()
    planning.clear()
    yield machine
    clear_cache()
    decision_cache.clear()
    planning.clear()


# ------------------------------------------------------------------------------ the probe


def test_probe_answers_per_device(gpus):
    first, second = probe(device=0), probe(device="cuda:1")
    assert (first.device_index, first.device_name, first.sm_count) == (0, "Fake H200 #0", 132)
    assert (second.device_index, second.device_name, second.sm_count) == \
        (1, "Fake H200 #1", 128)
    assert first != second and hash(first) != hash(second)
    assert probe(device=CUDA1) is second and probe(device=torch.device("cuda", 0)) is first
    assert gpus.probed == [0, 1]  # each probed once, then served from memory


def test_default_is_the_current_device(gpus):
    assert probe().device_index == 0
    gpus.current = 1
    assert probe().device_index == 1 and probe(device="cuda").device_index == 1
    assert probe() is probe(device=1)


def test_cpu_and_missing_devices(gpus):
    cpu = probe(device="cpu")
    assert cpu.device_type == "cpu" and cpu.device_index is None
    assert probe(device=torch.device("cpu")) is cpu
    for bad in ("cuda:2", 5, -1):
        with pytest.raises(ValueError, match="sees 2 GPU"):
            probe(device=bad)
    with pytest.raises(InputError, match="^device: expected a torch device"):  # ValueError
        probe(device="not a device")
    with pytest.raises(InputError, match="^device: "):
        probe(device=True)


def test_disk_cache_has_a_file_per_gpu_keyed_by_its_uuid(gpus, tmp_path):
    first, second = probe(device=0), probe(device=1)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == ["capabilities-cuda0-uuid-gpu-0.json", "capabilities-cuda1-uuid-gpu-1.json"]
    stored = json.loads((tmp_path / "cache" / "capabilities-cuda1-uuid-gpu-1.json").read_text())
    assert stored["key"]["uuid"] == "uuid-gpu-1" and stored["key"]["device_index"] == 1
    assert stored["capabilities"]["device_name"] == "Fake H200 #1"

    clear_cache()  # a new process: both come from disk, each its own
    gpus.probed.clear()
    assert probe(device=1) == second and probe(device=0) == first
    assert gpus.probed == []

    clear_cache()  # another GPU now sits at index 1: it has no file yet, re-probed
    gpus.uuids[1] = "uuid-of-a-swapped-gpu"
    assert probe(device=1) == second
    assert gpus.probed == [1]
    stored = json.loads((tmp_path / "cache" /
                         "capabilities-cuda1-uuid-of-a-swapped-gpu.json").read_text())
    assert stored["key"]["uuid"] == "uuid-of-a-swapped-gpu"


def test_one_gpu_workers_keep_one_file_each(gpus, tmp_path):
    """Workers started with CUDA_VISIBLE_DEVICES=i each see their GPU as cuda:0: named by
    index they shared one file and overwrote each other's entry at every start, so a
    restarted worker probed again (a child process and Triton compiles on a GPU)."""
    for uuid in ("uuid-gpu-a", "uuid-gpu-b"):  # each worker's first start
        clear_cache()
        gpus.uuids[0] = uuid
        probe(device=0)
    gpus.probed.clear()
    for uuid in ("uuid-gpu-a", "uuid-gpu-b"):  # both restarted: read from disk
        clear_cache()
        gpus.uuids[0] = uuid
        probe(device=0)
        assert last_probe_origin() == "disk-cache", uuid
    assert gpus.probed == []


def test_one_gpu_at_two_indices_keeps_a_file_per_index(gpus, tmp_path):
    """A GPU seen as cuda:1 by a process that sees every GPU and as cuda:0 by a
    CUDA_VISIBLE_DEVICES=1 worker: its entries (keyed by index and UUID) get a file each,
    so neither overwrites the other's and both restarts read from disk (session 42's
    review: named by UUID alone, each start found the other's key stale)."""
    gpus.uuids[0], gpus.uuids[1] = "uuid-a", "uuid-x"
    probe(device=1)  # the process that sees both
    clear_cache()
    gpus.uuids[0] = "uuid-x"  # the worker
    probe(device=0)
    gpus.probed.clear()
    for index, uuids in ((0, ("uuid-x", "uuid-a")), (1, ("uuid-a", "uuid-x"))):
        clear_cache()  # each restarted
        gpus.uuids[0], gpus.uuids[1] = uuids
        probe(device=index)
        assert last_probe_origin() == "disk-cache", index
    assert gpus.probed == []
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "capabilities-cuda0-uuid-x.json", "capabilities-cuda1-uuid-x.json"]


def test_refresh_of_one_device_keeps_the_other(gpus):
    first, second = probe(device=0), probe(device=1)
    gpus.probed.clear()
    assert probe(device=1, refresh=True) == second
    assert gpus.probed == [1]
    assert probe(device=0) is first


def test_simulated_profiles_ignore_the_device(gpus):
    assert probe("sm90", device=1) is probe("sm90", device=0)
    assert probe("sm90").device_index is None


def test_capabilities_round_trip_keeps_the_index(gpus):
    caps = probe(device=1)
    assert type(caps).from_dict(json.loads(json.dumps(caps.to_dict()))) == caps


# ------------------------------------------------------------------ decisions and plans


def test_decisions_are_cached_per_device(gpus):
    problem = Problem.make()
    before = len(decision_cache)
    decide(problem, probe(device=0))
    decide(problem, probe(device=1))
    assert len(decision_cache) == before + 2
    decide(problem, probe(device=1))
    assert len(decision_cache) == before + 2


def _fake_batch(q_device=CUDA0, cache_device=None, meta_device=None, *, tokens=2):
    """q, cache, metadata as fake tensors (call inside a FakeTensorMode)."""
    cache_device = q_device if cache_device is None else cache_device
    meta_device = q_device if meta_device is None else meta_device
    q = torch.empty(tokens, 4, 64, dtype=torch.float16, device=q_device)
    k = torch.empty(8, 16, 2, 64, dtype=torch.float16, device=cache_device)
    cache = PagedKVCache(k, torch.empty_like(k))
    metadata = AttentionMetadata(
        torch.zeros(tokens + 1, dtype=torch.int32, device=meta_device),
        torch.zeros(tokens, dtype=torch.int32, device=meta_device),
        torch.zeros(tokens, 4, dtype=torch.int32, device=meta_device),
        max_seqlen_q=1, max_seqlen_k=64)
    return q, cache, metadata


@pytest.fixture
def fake_mode():
    with fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def test_explain_probes_the_device_of_q_not_the_current_one(gpus, fake_mode, monkeypatch):
    api = importlib.import_module("portattn.api")
    asked = []
    monkeypatch.setattr(api, "probe", lambda **kw: asked.append(kw) or probe(**kw))
    q, cache, metadata = _fake_batch(CUDA1)
    gpus.current = 0
    portattn.explain(q, cache, metadata)
    assert asked == [{"device": CUDA1}]


def test_plan_bodies_are_per_device_and_decided_with_that_device(gpus, fake_mode,
                                                                 monkeypatch):
    asked = []
    monkeypatch.setattr(planning, "probe", lambda **kw: asked.append(kw) or probe(**kw))
    plans = [portattn.plan(_fake_batch(device)[2], num_q_heads=4, dtype=torch.float16,
                           num_kv_heads=2, head_size_qk=64, block_size=16,
                           backend="torch_ref")
             for device in (CUDA0, CUDA1, CUDA1)]
    assert asked == [{"device": CUDA0}, {"device": CUDA1}]  # the third is a hit
    assert plans[0]._body is not plans[1]._body and plans[1]._body is plans[2]._body
    assert plans[1]._body.device == CUDA1


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def _body_on(index):
    body = object.__new__(planning.PlanBody)
    body.runner = _Recorder()
    body._cuda_index = index
    return body


def _fake_on_device(current: dict, switched: list | None = None):
    """A stand-in for ``portattn.devices.on_device`` over a fake current GPU
    (``current["index"]``): switches for the block (None: stays), restores after, and
    records each requested index in ``switched``."""
    @contextlib.contextmanager
    def on_device(index):
        if switched is not None:
            switched.append(index)
        before = current["index"]
        current["index"] = before if index is None else index
        try:
            yield
        finally:
            current["index"] = before

    return on_device


def test_cache_write_follows_the_probe_of_the_caches_gpu(gpus, monkeypatch):
    """A Triton that imports but cannot run our kernels on a GPU (here: cuda:1's kernel
    check fails) sends that GPU's cache write to PyTorch with a warning naming why, as it
    sends ``attention`` to another backend; cuda:0's write still launches the kernel."""
    types_mod = importlib.import_module("portattn.types")
    write_launch = pytest.importorskip("portattn.kernels.write_launch",
                                       reason="needs Triton for the write kernel module")
    why = "a test kernel failed to compile: Cannot find ptxas-blackwell"
    monkeypatch.setattr(probe_mod, "_kernel_checks", lambda _check, _triton, _interp, gpu, _err: (
        "cuda:90", Check(gpu != 1, "fake GPU" if gpu != 1 else why), Check(False, why)))
    launched, pytorch_writes = [], []
    monkeypatch.setattr(write_launch, "launch_cache_write",
                        lambda cache, *args: launched.append(cache.device))

    class WentToPyTorch(Exception):
        pass

    def warn_slow_write(cache):  # the PyTorch write's first step; fake tensors stop there
        pytorch_writes.append((cache.device, types_mod._write_kernel_refusal(cache.device)))
        raise WentToPyTorch

    monkeypatch.setattr(types_mod, "_warn_slow_write", warn_slow_write)
    monkeypatch.setattr(importlib.import_module("portattn.devices"), "on_device",
                        lambda index: contextlib.nullcontext())
    with fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        for device in (CUDA0, CUDA1):
            _, cache, _ = _fake_batch(device)
            key = torch.empty(3, 2, 64, dtype=torch.float16, device=device)
            slots = torch.zeros(3, dtype=torch.int64, device=device)
            try:
                cache.write(key, torch.empty_like(key), slots)
            except WentToPyTorch:
                pass
    assert launched == [CUDA0]
    assert pytorch_writes == [(CUDA1, why)]

    monkeypatch.setenv("PORTATTN_TRITON", "0")  # remembered per environment: seen at once
    with fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        _, cache, _ = _fake_batch(CUDA0)
        key = torch.empty(3, 2, 64, dtype=torch.float16, device=CUDA0)
        with pytest.raises(WentToPyTorch):
            cache.write(key, torch.empty_like(key),
                        torch.zeros(3, dtype=torch.int64, device=CUDA0))
    assert launched == [CUDA0] and pytorch_writes[-1][0] == CUDA0
    assert "PORTATTN_TRITON" in pytorch_writes[-1][1]


def test_launch_switches_to_the_plans_gpu_only_when_another_is_current(monkeypatch):
    current = {"index": 0}
    switched: list = []
    on_device = _fake_on_device(current, switched)
    monkeypatch.setattr(planning, "_current_cuda_device", lambda: current["index"])
    monkeypatch.setattr(planning, "on_device", on_device)
    body = _body_on(1)
    q = torch.zeros(1)  # the runner is a stand-in: only q's requires_grad is read
    body.launch(q, "cache", "metadata", "out", (), None)
    assert switched == [1] and current["index"] == 0  # restored after the launch
    current["index"] = 1
    body.launch(q, "cache", "metadata", "out", (), None)
    assert switched == [1]  # already current: no guard
    _body_on(None).launch(q, "cache", "metadata", "out", (), None)  # CPU: never
    assert switched == [1] and len(body.runner.calls) == 2


# ------------------------------------------------------------ tensors on different GPUs


def _raises(argument, fn, *args, **kwargs):
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    assert info.value.argument == argument, str(info.value)
    assert "cuda:" in str(info.value)
    return info.value


def test_q_and_cache_on_different_gpus(gpus, fake_mode):
    q, cache, metadata = _fake_batch(CUDA1, cache_device=CUDA0)
    error = _raises("q", portattn.explain, q, cache, metadata)
    assert error.expected == "device cuda:0 (the cache's)" and error.got == "cuda:1"


def test_metadata_on_another_gpu(gpus, fake_mode):
    q, cache, metadata = _fake_batch(CUDA1, meta_device=CUDA0)
    _raises("metadata.cu_seqlens_q", portattn.explain, q, cache, metadata)


@pytest.mark.parametrize("argument", ["out", "alibi_slopes", "sinks"])
def test_per_layer_tensors_on_another_gpu(gpus, fake_mode, argument):
    q, cache, metadata = _fake_batch(CUDA1)
    tensors = {"out": torch.empty(2, 4, 64, dtype=torch.float16, device=CUDA0),
               "alibi_slopes": torch.empty(4, dtype=torch.float32, device=CUDA0),
               "sinks": torch.empty(4, dtype=torch.float32, device=CUDA0)}
    _raises(argument, portattn.explain, q, cache, metadata, **{argument: tensors[argument]})


@pytest.mark.parametrize("argument", ["q_scale", "output_scale"])
def test_scale_tensors_on_another_gpu(gpus, fake_mode, argument):
    fp8 = torch.float8_e4m3fn
    q, cache, metadata = _fake_batch(CUDA1)
    scale = torch.ones(1, dtype=torch.float32, device=CUDA0)
    if argument == "q_scale":
        q = q.to(fp8)
        kwargs = {"q_scale": scale}
    else:
        kwargs = {"out": torch.empty(2, 4, 64, dtype=fp8, device=CUDA1),
                  "output_scale": scale}
    _raises(argument, portattn.explain, q, cache, metadata, **kwargs)


def test_quant_scales_and_scale_caches_on_another_gpu(gpus, fake_mode):
    k = torch.empty(8, 16, 2, 64, dtype=torch.float8_e4m3fn, device=CUDA1)
    with pytest.raises(InputError) as info:
        PagedKVCache(k, torch.empty_like(k), portattn.KVQuant.fp8_per_tensor(
            torch.ones(1, device=CUDA0), 1.0))
    assert info.value.argument == "quant.k_scale"
    scales = torch.empty(8, 16, 2, dtype=torch.float32, device=CUDA0)
    with pytest.raises(InputError) as info:
        PagedKVCache(k, torch.empty_like(k), portattn.KVQuant.fp8_per_token_head(),
                     k_scale_cache=scales, v_scale_cache=scales.to(CUDA1))
    assert info.value.argument.endswith("k_scale_cache")


def test_plan_run_with_q_on_another_gpu_than_the_plans_metadata(gpus, fake_mode):
    _, cache0, metadata0 = _fake_batch(CUDA0)
    plan = portattn.plan(metadata0, num_q_heads=4, dtype=torch.float16, cache=cache0,
                         backend="torch_ref")
    q1, cache1, _ = _fake_batch(CUDA1)
    error = _raises("q", plan.run, q1, cache1)
    assert error.got == "cuda:1" and "cuda:0" in error.expected
    q0 = torch.empty(2, 4, 64, dtype=torch.float16, device=CUDA0)
    error = _raises("q", plan.run, q0, cache1)  # q fits the plan, the cache does not
    assert "cuda:1" in error.expected and error.got == "cuda:0"


# ------------------------------------------------------------------------------ report


def test_report_has_a_section_per_gpu(gpus):
    gpus.current = 1
    report = collect_report()
    assert report["capabilities"]["device_index"] == 1
    assert [(d["device_index"], d["device_name"]) for d in report["devices"]] == \
        [(0, "Fake H200 #0"), (1, "Fake H200 #1")]
    assert json.loads(json.dumps(report))["devices"] == report["devices"]
    text = render_report(report)
    assert "Device cuda:0\n" in text and "Device cuda:1 (current)\n" in text
    assert "Capabilities of the current device (cuda:1)\n" in text
    assert text.index("Fake H200 #0") < text.index("Fake H200 #1")


def test_report_of_a_simulated_profile_lists_that_one_device(gpus):
    caps = probe("sm90")
    report = collect_report(caps)
    assert report["devices"] == [caps.to_dict()]
    assert "\nDevice\n" in render_report(report)


def test_report_without_a_gpu_lists_the_cpu(gpus, monkeypatch):
    monkeypatch.setattr(probe_mod, "_gpu_index", lambda: None)
    monkeypatch.setattr(probe_mod, "_gpu_count", lambda: 0)
    report = collect_report()
    assert [d["device_type"] for d in report["devices"]] == ["cpu"]


def test_cli_report_json_lists_both_gpus(gpus, capsys):
    from portattn.cli import main

    assert main(["report", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [d["device_index"] for d in report["devices"]] == [0, 1]


def test_device_index_changes_the_hash_of_otherwise_equal_capabilities():
    caps = probe("sm90")
    assert dataclasses.replace(caps, device_index=1) != dataclasses.replace(caps,
                                                                          device_index=0)


@pytest.mark.parametrize("argument", ["key", "value", "slot_mapping"])
def test_cache_write_from_another_gpu(gpus, fake_mode, argument):
    _, cache, _ = _fake_batch(CUDA1)
    tensors = {"key": torch.empty(3, 2, 64, dtype=torch.float16, device=CUDA1),
               "value": torch.empty(3, 2, 64, dtype=torch.float16, device=CUDA1),
               "slot_mapping": torch.zeros(3, dtype=torch.int64, device=CUDA1)}
    tensors[argument] = tensors[argument].to(CUDA0)
    error = _raises(argument, cache.write, tensors["key"], tensors["value"],
                    tensors["slot_mapping"])
    assert error.got == "cuda:0" or "cuda:0" in error.got


# ------------------------------------------------------------------ the device guard


def test_on_device_switches_only_to_another_cuda_device(monkeypatch):
    devices = importlib.import_module("portattn.devices")
    monkeypatch.setattr(devices, "_get_device", lambda: 0)
    assert isinstance(devices.on_device(None), contextlib.nullcontext)
    assert isinstance(devices.on_device(0), contextlib.nullcontext)
    guard = devices.on_device(1)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert devices.cuda_index(torch.device("cpu")) is None
    assert devices.cuda_index(CUDA1) == 1 and devices.cuda_index(torch.device("cuda")) == 0


def test_cache_write_launches_with_the_caches_gpu_current(gpus, fake_mode, monkeypatch):
    devices = importlib.import_module("portattn.devices")
    write_launch = pytest.importorskip("portattn.kernels.write_launch",
                                       reason="needs Triton for the write kernel module")
    current = {"index": 0}
    seen = []
    on_device = _fake_on_device(current)
    monkeypatch.setattr(devices, "_get_device", lambda: current["index"])
    monkeypatch.setattr(devices, "on_device", on_device)
    monkeypatch.setattr(write_launch, "launch_cache_write",
                        lambda cache, *args: seen.append(current["index"]))
    _, cache, _ = _fake_batch(CUDA1)
    key = torch.empty(3, 2, 64, dtype=torch.float16, device=CUDA1)
    cache.write(key, torch.empty_like(key), torch.zeros(3, dtype=torch.int64, device=CUDA1))
    assert seen == [1] and current["index"] == 0
