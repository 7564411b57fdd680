"""The GPU replay path of ``triton_unified`` plans, simulated on the CPU.

On a GPU a plan records launch.py's launches once and then calls the compiled kernels'
launchers with raw pointers. Here the kernels launch.py wraps are swapped for stand-ins
that use Triton's real binder and cache key, and whose "compiled kernel" launcher maps
the pointer ints back to tensors and runs the interpreted kernel. So the whole replay
path (runner, bindings, template, workspace offsets, misses, absorb) runs for real, and
every layer's result is compared with the float64 oracle, while the JIT path is counted:
after the first call of a structure it must not run again.
"""

from __future__ import annotations

import math

import pytest
import torch

import portattn
from jit_standin import JITStandIn, require_native_binder
from portattn import PagedKVCache, planning
from portattn.kernels import fast_launch, heuristics, launch
from portattn.testing import dense_attention, make_paged_batch, relative_error

pytestmark = pytest.mark.interpreter
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2, "i8": torch.int8,
          "i32": torch.int32, "i64": torch.int64}


class Memory:
    """Pointer ints back to tensors: every storage the test hands to attention."""

    def __init__(self):
        self.storages = []

    def add(self, *tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.storages.append(t.untyped_storage())

    def tensor_at(self, pointer: int, type_name: str) -> torch.Tensor:
        dtype = DTYPES[type_name.lstrip("*k")]
        size = torch.empty(0, dtype=dtype).element_size()
        for storage in self.storages:
            base = storage.data_ptr()
            if base <= pointer < base + storage.nbytes():
                offset = pointer - base
                assert offset % size == 0
                count = (storage.nbytes() - offset) // size
                return torch.empty(0, dtype=dtype).set_(storage, offset // size, (count,),
                                                        (1,))
        raise AssertionError(f"pointer {pointer:#x} is in no known tensor")


class SimCompiled:
    def __init__(self, kernel, specialization):
        self.kernel = kernel
        self.specialization = specialization
        self.function = object()
        self.packed_metadata = (4, 1, 0)

    def run(self, g0, g1, g2, stream, function, packed, metadata, enter, exit, *args):
        assert function is self.function and packed is self.packed_metadata
        assert (metadata, enter, exit) == (None, None, None)
        values = []
        for (type_name, _), arg in zip(self.specialization, args):
            is_pointer = isinstance(type_name, str) and type_name.startswith("*")
            if is_pointer and isinstance(arg, int):
                arg = self.kernel.memory.tensor_at(arg, type_name)
            values.append(arg)
        self.kernel.replays += 1
        self.kernel.streams.append(stream)
        self.kernel.grids.append((g0, g1, g2))
        self.kernel.interpreted[(g0, g1, g2)](*values)


class SimKernel(JITStandIn):
    """A JITFunction stand-in: Triton's binder and cache key, the interpreter to run."""

    def __init__(self, interpreted, memory: Memory):
        super().__init__(interpreted.fn)
        self.interpreted = interpreted
        self.memory = memory
        self.jit_runs = 0
        self.replays = 0
        self.streams: list = []
        self.grids: list = []  # of every launch, first (JIT) and replayed

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.jit_runs += 1
            self.grids.append(tuple(grid))
            _count.launches += 1
            _bound, specialization, key, kernel_cache = self.bind(args, kwargs)
            compiled = kernel_cache.setdefault(key, SimCompiled(self, specialization))
            names = self.arg_names
            self.interpreted[grid](*args, **{k: v for k, v in kwargs.items() if k in names})
            return compiled

        return run


class _count:
    launches = 0


def _counting():
    """fast_launch._count_launches for the stand-ins (Triton's hook never runs here)."""
    class Counter:
        def __init__(self):
            self.start = _count.launches

        @property
        def count(self):
            return _count.launches - self.start

        def stop(self):
            pass

    return Counter()


def _install_sim(monkeypatch, backend=None) -> tuple[Memory, dict]:
    """launch.py's kernels swapped for :class:`SimKernel` stand-ins (with Triton backend
    ``backend`` in their kernel caches where given), the launch counter and device seams
    patched, the plan caches cleared."""
    memory = Memory()
    kernels = {}
    for name in ("unified_attention_kernel", "merge_segments_kernel"):
        wrapped = getattr(launch, name)
        kernels[name] = SimKernel(wrapped.fn, memory)
        if backend is not None:
            cache, keys, target, _backend, binder = kernels[name].device_caches[0]
            kernels[name].device_caches = {0: (cache, keys, target, backend, binder)}
        monkeypatch.setattr(wrapped, "fn", kernels[name])
    monkeypatch.setattr(fast_launch, "_count_launches", _counting)
    monkeypatch.setattr(fast_launch, "_device_functions", lambda: (lambda: 0, lambda d: 0))
    # float scales' tensors kept as a GPU's would be: under CUDA index 0 and stream 0, the
    # device and stream the relaunch passes (so it finds them without asking)
    from portattn.backends import unified_runner
    from portattn.kernels import scalars

    for module in (scalars, unified_runner):
        monkeypatch.setattr(module, "stream_key", lambda device: 0)
    monkeypatch.setattr(scalars, "cuda_index", lambda device: 0)
    planning.clear()
    return memory, kernels


@pytest.fixture
def sim(monkeypatch):
    require_native_binder()
    yield _install_sim(monkeypatch)
    planning.clear()


def _replaying(plan):
    runner = plan._body.runner
    runner.replay = True
    runner._capturing = lambda: False
    runner._stream = lambda index: 0
    return runner


def _every_call_takes_the_jit_path(plan, batch, memory, kernels, expected) -> None:
    """Three calls of ``plan``, each the oracle's result through Triton's JIT (none
    replayed); ``memory`` (None: not replaying) learns each ``out``."""
    for calls in (1, 2, 3):
        out = torch.full_like(batch.q, math.nan)
        if memory is not None:
            memory.add(out)
        plan.run(batch.q, batch.cache, out)
        assert relative_error(out, expected) < 3e-3
        assert kernels["unified_attention_kernel"].jit_runs == calls
    assert sum(k.replays for k in kernels.values()) == 0


CASES = {  # query lens, seq lens, group, environment
    "decode-2d": ([1, 1, 1], [21, 7, 30], 2, {}),
    "decode-3d": ([1, 2], [300, 9], 2, {"PORTATTN_UNIFIED_SPLIT": "1"}),
    # the split partials merged by the merge kernel (no room for merge tickets)
    "decode-3d+merge-kernel": ([1, 2], [300, 9], 2, {"PORTATTN_UNIFIED_SPLIT": "1"}),
    "mixed": ([1, 20], [9, 33], 4, {}),
}


def _run_layers(plan, batch, memory, kernels, query_lens, heads) -> None:
    """Four layers through ``plan.run`` (the runner set to replay; caches scaled per
    layer, fresh q and sinks), each against the float64 oracle; from the second layer on
    the JIT path must not run."""
    runner = _replaying(plan)
    memory.add(batch.metadata.cu_seqlens_q, batch.metadata.seq_lens,
               batch.metadata.block_table)
    gen = torch.Generator().manual_seed(3)
    for layer, s in enumerate((1.0, -0.5, 2.0, 0.75)):
        cache = PagedKVCache(batch.cache.key_cache * s, batch.cache.value_cache * s)
        q = torch.randn(batch.q.shape, generator=gen).half()
        sinks = torch.randn(heads, generator=gen)
        out = torch.full_like(q, math.nan)
        memory.add(q, cache.key_cache, cache.value_cache, out, sinks,
                   *runner._workspaces.values())
        runs = sum(k.jit_runs for k in kernels.values())
        if runner.workspace_size and not runner._workspaces:
            runner._workspace()  # allocate now, so its storage is known to the memory
            memory.add(*runner._workspaces.values())
        plan.run(q, cache, out, sinks=sinks)
        expected = dense_attention(q, [k * s for k in batch.keys],
                                   [v * s for v in batch.values], query_lens, sinks=sinks)
        assert relative_error(out, expected) < 3e-3, f"layer {layer}"
        if layer:  # replayed: the JIT path did not run again
            assert sum(k.jit_runs for k in kernels.values()) == runs


@pytest.mark.parametrize("case", list(CASES))
def test_replayed_layers_match_the_oracle(case, sim, monkeypatch):
    memory, kernels = sim
    query_lens, seq_lens, group, env = CASES[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if case.endswith("+merge-kernel"):
        monkeypatch.setattr(launch, "MERGE_TICKETS", 0)
    heads = 2 * group
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=heads, num_kv_heads=2,
                             head_size=32, dtype=torch.float16)
    plan = portattn.plan(batch.metadata, num_q_heads=heads, dtype=torch.float16,
                         cache=batch.cache, sinks=True, backend="triton_unified",
                         validate=False)
    assert plan.variant.startswith(case.split("+")[0])
    _run_layers(plan, batch, memory, kernels, query_lens, heads)
    slot = next(iter(plan._accepted.values()))
    assert slot.reason is None and slot.sequence is not None
    # decode-3d: one launch where the last segment program of each (sequence, kv head)
    # merges (heuristics.MERGE_IN_KERNEL), else the merge kernel's too
    split = 1 if heuristics.MERGE_IN_KERNEL else 2
    launches = {"decode-2d": 1, "decode-3d": split, "decode-3d+merge-kernel": 2,
                "mixed": 2}[case]
    assert len(slot.sequence.sites) == launches
    assert sum(k.replays for k in kernels.values()) == 3 * launches


def test_a_bucket_plan_replays_the_batch_own_segment_count(sim, monkeypatch):
    """3 decodes share the 4-sequence plan (the bucket). With 8 SMs and 2 kv heads, 4
    sequences fill the GPU (1 segment) and 3 do not (6 programs: 2 segments, the
    plan's ``segments_upto``): the runner records and replays 3 sequences' own 2-segment
    grid, and every layer matches the oracle."""
    import dataclasses

    from portattn.backends.triton_unified import TritonUnified

    memory, kernels = sim
    planned = TritonUnified.plan
    monkeypatch.setattr(TritonUnified, "plan", lambda self, problem, caps: planned(
        self, problem, dataclasses.replace(caps, sm_count=8)))
    query_lens, heads = [1, 1, 1], 4
    batch = make_paged_batch(query_lens, [300, 211, 140], num_q_heads=heads, num_kv_heads=2,
                             head_size=32, dtype=torch.float16)
    plan = portattn.plan(batch.metadata, num_q_heads=heads, dtype=torch.float16,
                         cache=batch.cache, sinks=True, backend="triton_unified",
                         validate=False)
    assert plan.variant.startswith("decode-2d-2seg-upto-3"), plan.variant
    _run_layers(plan, batch, memory, kernels, query_lens, heads)
    grids = kernels["unified_attention_kernel"].grids
    assert len(grids) == 4 and set(grids) == {(3, 2, 2)}  # 1 JIT launch, 3 replays
    assert kernels["unified_attention_kernel"].replays == 3


@pytest.mark.parametrize("case", ["decode-2d", "decode-3d"])
def test_the_runner_passes_its_device_and_workspace_stream(case, sim, monkeypatch):
    """A runner on cuda:0 (PlanBody.launch makes it current) tells the relaunch its
    device, and with a workspace the stream it looked up for it: the relaunch asks for
    neither again; without a workspace it asks only for the stream."""
    memory, kernels = sim
    query_lens, seq_lens, group, env = CASES[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    asked: list = []
    monkeypatch.setattr(fast_launch, "_device_functions", lambda: (
        lambda: asked.append("device") or 0, lambda d: asked.append(("stream", d)) or 7))
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=2 * group, num_kv_heads=2,
                             head_size=32, dtype=torch.float16)
    plan = portattn.plan(batch.metadata, num_q_heads=2 * group, dtype=torch.float16,
                         cache=batch.cache, backend="triton_unified", validate=False)
    runner = _replaying(plan)
    runner._index = 0
    runner._stream = lambda index: 5 + index
    memory.add(batch.metadata.cu_seqlens_q, batch.metadata.seq_lens,
               batch.metadata.block_table, batch.q, batch.cache.key_cache,
               batch.cache.value_cache)
    if runner.workspace_size:
        memory.add(runner._workspace())
    out = torch.full_like(batch.q, math.nan)
    memory.add(out)
    plan.run(batch.q, batch.cache, out)  # recorded
    asked.clear()
    expected = dense_attention(batch.q, batch.keys, batch.values, query_lens)
    for _ in range(2):
        out.fill_(math.nan)  # in place (the pointer the replay binds): each replay writes
        plan.run(batch.q, batch.cache, out)
        assert relative_error(out, expected) < 3e-3
    launches = sum(k.replays for k in kernels.values())
    per_call = 2 if runner.workspace_size and not heuristics.MERGE_IN_KERNEL else 1
    assert launches == 2 * per_call
    streams = [s for k in kernels.values() for s in k.streams]
    if runner.workspace_size:
        assert asked == [] and set(streams) == {5}
    else:
        assert asked == [("stream", 0)] * 2 and set(streams) == {7}


def test_graph_capture_takes_the_normal_path_with_its_own_workspace(sim, monkeypatch):
    """While a CUDA graph is captured, a split-KV call runs launch.py (which takes a
    workspace from the graph's pool), never a replay into the runner's workspace."""
    memory, kernels = sim
    monkeypatch.setenv("PORTATTN_UNIFIED_SPLIT", "1")
    batch = make_paged_batch([1, 2], [300, 9], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=torch.float16)
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float16,
                         cache=batch.cache, backend="triton_unified", validate=False)
    runner = _replaying(plan)
    assert runner.workspace_size
    runner._capturing = lambda: True
    memory.add(batch.metadata.cu_seqlens_q, batch.metadata.seq_lens,
               batch.metadata.block_table, batch.q, batch.cache.key_cache,
               batch.cache.value_cache)
    expected = dense_attention(batch.q, batch.keys, batch.values, [1, 2])
    _every_call_takes_the_jit_path(plan, batch, memory, kernels, expected)
    assert runner._workspaces == {}
    slot = next(iter(plan._accepted.values()))
    assert slot.sequence is None


def test_a_misaligned_q_is_absorbed_then_replayed(sim):
    memory, kernels = sim
    batch = make_paged_batch([1, 1], [19, 5], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=torch.float16)
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float16,
                         cache=batch.cache, backend="triton_unified", validate=False)
    _replaying(plan)
    memory.add(batch.metadata.cu_seqlens_q, batch.metadata.seq_lens,
               batch.metadata.block_table, batch.cache.key_cache, batch.cache.value_cache)
    expected = dense_attention(batch.q, batch.keys, batch.values, [1, 1])
    unified = kernels["unified_attention_kernel"]

    def run(q):
        out = torch.full_like(batch.q, math.nan)
        memory.add(q, out)
        plan.run(q, batch.cache, out)
        assert relative_error(out, expected) < 3e-3
        return unified.jit_runs

    aligned = batch.q.clone()
    shifted = torch.empty(batch.q.numel() + 1, dtype=torch.float16)[1:].view(batch.q.shape)
    shifted.copy_(batch.q)  # same strides, 2 bytes past 16-byte alignment
    assert shifted.data_ptr() % 16 == 2
    assert run(aligned) == 1
    assert run(aligned) == 1          # replayed
    assert run(shifted) == 2          # a new specialization: the JIT path, absorbed
    assert run(shifted) == 2 and run(aligned) == 2  # both replayed now
    kernel_cache = unified.device_caches[0][0]
    assert len(kernel_cache) == 2


def test_aliased_inputs_are_retried_then_given_up(sim):
    """One tensor passed as both sinks and ALiBi slopes cannot be attributed to a role:
    the call runs normally, a later unaliased call builds the sequence; a structure that
    keeps aliasing gives up (logged) and stays on the normal path, correct throughout."""
    memory, kernels = sim
    batch = make_paged_batch([1, 1], [19, 5], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=torch.float16)
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float16,
                         cache=batch.cache, sinks=True, alibi="linear",
                         backend="triton_unified", validate=False)
    runner = _replaying(plan)
    memory.add(batch.metadata.cu_seqlens_q, batch.metadata.seq_lens,
               batch.metadata.block_table, batch.q, batch.cache.key_cache,
               batch.cache.value_cache)
    shared = torch.linspace(-1.0, 1.0, 4)
    other = torch.linspace(0.5, 0.1, 4)
    memory.add(shared, other)

    def run(sinks, slopes):
        out = torch.full_like(batch.q, math.nan)
        memory.add(out)
        plan.run(batch.q, batch.cache, out, sinks=sinks, alibi_slopes=slopes)
        expected = dense_attention(batch.q, batch.keys, batch.values, [1, 1], sinks=sinks,
                                   alibi_slopes=slopes)
        assert relative_error(out, expected) < 3e-3

    run(shared, shared)
    slot = next(iter(plan._accepted.values()))
    assert slot.sequence is None and slot.ambiguous == 1
    run(other, shared)  # unaliased: recorded and replayable
    assert slot.sequence is not None and slot.reason is None
    runs = kernels["unified_attention_kernel"].jit_runs
    run(shared, shared)  # replayed by role: each pointer from its own argument
    assert kernels["unified_attention_kernel"].jit_runs == runs

    planning.clear()
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float16,
                         cache=batch.cache, sinks=True, alibi="linear",
                         backend="triton_unified", validate=False)
    runner = _replaying(plan)
    from portattn.backends.unified_runner import MAX_AMBIGUOUS

    for _ in range(MAX_AMBIGUOUS):
        run(shared, shared)
    slot = next(iter(plan._accepted.values()))
    assert slot.reason and "one tensor is inputs [7, 8]" in slot.reason
    run(other, shared)  # the structure stays on the normal path, still right
    assert runner is plan._body.runner


def test_equal_float_kv_scales_replay(sim, monkeypatch):
    """An fp8 per-tensor cache whose K and V scales are the same float: each role gets its
    own device scalar, so the inputs never alias and the second call replays (on the
    H200 this structure ran 140 us of host time per call through the JIT before)."""
    from portattn.backends import unified_runner
    from portattn.backends.unified_runner import inputs_of

    memory, kernels = sim
    batch, plan = _fp8_decode_plan(memory, (19, 40), 0.5, 0.5)
    inputs = inputs_of(batch.q, batch.cache, batch.metadata, batch.q, (None,) * 4, None)
    k_scale, v_scale = inputs[12], inputs[13]
    assert k_scale is not v_scale and float(k_scale) == float(v_scale) == 0.5
    memory.add(k_scale, v_scale)

    outs = []
    for _ in range(2):
        out = torch.full_like(batch.q, math.nan)
        memory.add(out)
        plan.run(batch.q, batch.cache, out)
        outs.append(out)
    slot = next(iter(plan._accepted.values()))
    assert slot.ambiguous == 0 and slot.sequence is not None and slot.reason is None
    runs = kernels["unified_attention_kernel"].jit_runs
    out = torch.full_like(batch.q, math.nan)
    memory.add(out)
    found = []
    find = unified_runner._find_on_queue
    monkeypatch.setattr(unified_runner, "_find_on_queue",
                        lambda key: found.append(key) or find(key))
    plan.run(batch.q, batch.cache, out)
    assert kernels["unified_attention_kernel"].jit_runs == runs  # replayed
    # each scale found by the relaunch's device and stream: its role's tensor
    assert [key[0] for key in found] == ["k", "v"]
    assert find(found[0]) is k_scale and find(found[1]) is v_scale
    assert torch.equal(out, outs[0]) and not out.isnan().any()
    _check_fp8_decode(out, batch, (19, 40), 0.5, 0.5)


def _fp8_decode_plan(memory, seq_lens, k_scale: float, v_scale: float):
    """One query per sequence over an fp8 per-tensor cache (group 2, head 32, fp16): the
    batch and its replaying plan, its tensors known to the simulated memory."""
    from portattn import KVQuant

    batch = make_paged_batch([1] * len(seq_lens), list(seq_lens), num_q_heads=4,
                             num_kv_heads=2, head_size=32, dtype=torch.float16,
                             quant=KVQuant.fp8_per_tensor(k_scale, v_scale))
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float16,
                         cache=batch.cache, backend="triton_unified", validate=False)
    _replaying(plan)
    memory.add(batch.metadata.cu_seqlens_q, batch.metadata.seq_lens,
               batch.metadata.block_table, batch.q, batch.cache.key_cache,
               batch.cache.value_cache)
    return batch, plan


def _check_fp8_decode(out, batch, seq_lens, k_scale: float, v_scale: float) -> None:
    """One query per sequence, group 2, head 32, against codes times the scales read from
    the cache's raw fp8 storage (not portattn.quant)."""
    keys = batch.cache.key_cache.float() * k_scale
    values = batch.cache.value_cache.float() * v_scale
    table, block_size = batch.metadata.block_table, batch.cache.block_size
    gathered_k, gathered_v = [], []
    for seq, length in enumerate(seq_lens):
        slots = torch.arange(length)
        blocks = table[seq, slots // block_size].long()
        gathered_k.append(keys[blocks, slots % block_size])    # [len, kv heads, head]
        gathered_v.append(values[blocks, slots % block_size])
    expected = dense_attention(batch.q, gathered_k, gathered_v, [1] * len(seq_lens))
    for seq in range(len(seq_lens)):
        assert relative_error(out[seq], expected[seq]) < 3e-3


def test_float_scales_the_memo_refused_are_not_recorded(sim, monkeypatch):
    """A float scale the device-scalar memo does not keep (full, or first met while a CUDA
    graph was captured) is a new tensor at every read, which a recording cannot bind: the
    call runs the normal path unrecorded instead of refusing the structure for good (it
    was refused: every later call of it through the JIT), and records once the memo keeps
    its scales."""
    from portattn.backends.unified_runner import inputs_of
    from portattn.kernels.scalars import device_scalars

    memory, kernels = sim
    k_scale, v_scale = 0.4375, 0.8125  # values no other test puts in the memo
    batch, plan = _fp8_decode_plan(memory, (23, 37), k_scale, v_scale)
    monkeypatch.setattr(device_scalars, "capacity", 0)  # refuses every new value
    for _ in range(3):
        out = torch.full_like(batch.q, math.nan)
        plan.run(batch.q, batch.cache, out)
        _check_fp8_decode(out, batch, (23, 37), k_scale, v_scale)
    slot = next(iter(plan._accepted.values()))
    assert slot.sequence is None and slot.reason is None, slot.reason
    assert not device_scalars.kept(k_scale, batch.q.device, "k")

    monkeypatch.setattr(device_scalars, "capacity", 4096)
    inputs = inputs_of(batch.q, batch.cache, batch.metadata, batch.q, (None,) * 4, None)
    memory.add(inputs[12], inputs[13])  # the memo's scalars, kept from now on
    for _ in range(2):  # records (then replays or adds this call's alignments)
        out = torch.full_like(batch.q, math.nan)
        memory.add(out)
        plan.run(batch.q, batch.cache, out)
    assert slot.sequence is not None and slot.reason is None
    runs = kernels["unified_attention_kernel"].jit_runs
    out = torch.full_like(batch.q, math.nan)
    memory.add(out)
    plan.run(batch.q, batch.cache, out)
    assert kernels["unified_attention_kernel"].jit_runs == runs  # replayed
    _check_fp8_decode(out, batch, (23, 37), k_scale, v_scale)


def test_a_call_that_fell_back_from_descriptors_is_not_recorded(sim, monkeypatch):
    """A descriptor launch that fails in auto mode is rerun with pointer loads inside the
    same call: that capture holds the discarded launch, so no sequence is built from it
    (replays would run the failed kernel again); the next call records the pointer path."""
    memory, kernels = sim
    batch = make_paged_batch([1, 1], [19, 5], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=torch.float16)
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float16,
                         cache=batch.cache, backend="triton_unified", validate=False)
    runner = _replaying(plan)
    memory.add(batch.metadata.cu_seqlens_q, batch.metadata.seq_lens,
               batch.metadata.block_table, batch.q, batch.cache.key_cache,
               batch.cache.value_cache)
    original = runner._launch

    def failing_once(*args, **kwargs):
        launch.DESCRIPTOR_FAILED[("test",)] = "simulated compile failure"
        runner._launch = original
        original(*args, **kwargs)

    runner._launch = failing_once
    monkeypatch.setattr(launch, "DESCRIPTOR_FAILED", dict(launch.DESCRIPTOR_FAILED))
    out = torch.full_like(batch.q, math.nan)
    memory.add(out)
    expected = dense_attention(batch.q, batch.keys, batch.values, [1, 1])
    plan.run(batch.q, batch.cache, out)
    assert relative_error(out, expected) < 3e-3
    slot = next(iter(plan._accepted.values()))
    assert slot.sequence is None and slot.reason is None
    out.fill_(math.nan)  # the recording call must write its own result
    plan.run(batch.q, batch.cache, out)
    assert slot.sequence is not None
    assert relative_error(out, expected) < 3e-3


def test_a_recorder_that_cannot_read_triton_keeps_the_jit_path(sim, monkeypatch, caplog):
    """A Triton release that renamed what the recorder reads (here: building the
    sequence raises AttributeError) costs the fast path, never the call: every call runs
    the JIT path with the oracle's result, and the reason is logged once."""
    memory, kernels = sim

    def renamed(*args, **kwargs):
        raise AttributeError("'CompiledKernel' object has no attribute 'packed_metadata'")

    monkeypatch.setattr(fast_launch.LaunchSequence, "build", renamed)
    batch = make_paged_batch([1, 1, 1], [21, 7, 30], num_q_heads=4, num_kv_heads=2,
                             head_size=32, dtype=torch.float16)
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float16,
                         cache=batch.cache, backend="triton_unified", validate=False)
    _replaying(plan)
    memory.add(batch.metadata.cu_seqlens_q, batch.metadata.seq_lens,
               batch.metadata.block_table, batch.cache.key_cache, batch.cache.value_cache)
    expected = dense_attention(batch.q, batch.keys, batch.values, [1, 1, 1])
    with caplog.at_level("WARNING", logger="portattn"):
        _every_call_takes_the_jit_path(plan, batch, memory, kernels, expected)
    slot = next(iter(plan._accepted.values()))
    assert slot.reason == ("recording the launches failed: AttributeError: 'CompiledKernel' "
                           "object has no attribute 'packed_metadata'")
    assert sum("packed_metadata" in r.getMessage() for r in caplog.records) == 1


def test_a_binder_in_python_keeps_the_jit_path(monkeypatch):
    """A Triton backend without native tensor specialization (Triton 3.5's CUDA backend,
    AMD's) may specialize a pointer by more than its alignment: the plan refuses to
    record, says why once, and every call runs the JIT path with the oracle's result."""
    class PythonBinder:  # the attribute Triton 3.6 added, off (or missing on 3.5)
        supports_native_tensor_specialization = False

    _memory, kernels = _install_sim(monkeypatch, PythonBinder)
    batch = make_paged_batch([1, 1, 1], [21, 7, 30], num_q_heads=4, num_kv_heads=2,
                             head_size=32, dtype=torch.float16)
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float16,
                         cache=batch.cache, backend="triton_unified", validate=False)
    _replaying(plan)
    expected = dense_attention(batch.q, batch.keys, batch.values, [1, 1, 1])
    try:
        _every_call_takes_the_jit_path(plan, batch, None, kernels, expected)
        slot = next(iter(plan._accepted.values()))
        assert slot.sequence is not None and slot.reason is not None
        assert "specializes tensors in Python" in slot.reason
    finally:
        planning.clear()
