"""Shared state under threads, bounded memos, and no cache kept alive (CPU, ``torch_ref``).

* Eight threads call ``attention`` and ``plan.run`` at once with their own caches and
  problems (dtypes, GQA, head sizes, DiffKV, quantized caches, windows, softcap, scale),
  some sharing one metadata object; every result is checked against the float64 dense
  oracle of :mod:`portattn.testing` (which reads the K/V it generated, not the cache).
* Concurrent first use of one problem, and concurrent eviction with tiny memos.
* Memos stay within their bounds after thousands of distinct problems.
* A cache used by every path (attention, plan.run, a call that raised) is freed once the
  caller drops it; so is a metadata object's memo entry.
* The metadata memo survives finalizers that run while it is cleared or evicts.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

import portattn
from portattn import AttentionMetadata, InputError, KVQuant, PagedKVCache, planning
from portattn.dispatch.announce import announced
from portattn.dispatch.selector import decision_cache
from portattn.testing import dense_attention, make_paged_batch, relative_error
from thread_errors import errors_in_threads

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
TOLERANCE = {F32: 1e-5, F16: 3e-3, BF16: 2e-2}
THREADS = 8


@pytest.fixture(autouse=True)
def fresh_plans():
    planning.clear()
    yield
    planning.clear()


def _hinted(batch):
    """The batch with both length hints (so ``attention`` serves it from its memo)."""
    m = batch.metadata
    batch.metadata = AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table,
                                       max(batch.query_lens), max(batch.seq_lens))
    return batch


#: (query lens, seq lens, q heads, kv heads, head qk, head v, block, dtype, quant, options)
PROBLEMS = [
    ([1, 1], [9, 30], 4, 2, 32, 32, 16, F32, None, {}),
    ([3, 1], [7, 12], 8, 1, 16, 16, 4, F16, None, {"sliding_window": 5}),
    ([2], [21], 6, 3, 24, 24, 8, BF16, None, {"softcap": 20.0}),
    ([1, 4, 2], [5, 9, 17], 4, 4, 32, 16, 8, F32, None, {"scale": 0.3}),
    ([2, 2], [6, 6], 4, 2, 16, 16, 4, F32, "fp8", {"causal": False}),
    ([1, 3], [11, 13], 4, 2, 32, 32, 16, F16, "int8", {"sliding_window": 3}),
    ([4], [4], 2, 1, 16, 16, 8, F32, None, {"softcap": 5.0, "scale": 0.1}),
    ([1, 1, 1], [3, 20, 40], 8, 2, 16, 16, 16, F16, "fp8", {}),
]


def _batch(index: int, seed: int):
    ql, sl, hq, hkv, hs, hsv, bs, dtype, quant, options = PROBLEMS[index]
    kv_quant = {None: None, "fp8": KVQuant.fp8_per_tensor(0.05, 0.07),
                "int8": KVQuant.int8_per_token_head()}[quant]
    batch = make_paged_batch(ql, sl, num_q_heads=hq, num_kv_heads=hkv, head_size=hs,
                             head_size_v=hsv, block_size=bs, dtype=dtype, quant=kv_quant,
                             seed=seed)
    return _hinted(batch), options


def _check(batch, options, out) -> float:
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens, **options)
    error = relative_error(out, expected)
    assert error < TOLERANCE[batch.q.dtype], (batch.q.dtype, options, error)
    return error


def test_threads_with_their_own_caches_and_problems():
    """Every thread its own batches (a new cache each call), half through attention and
    half through a plan; the threads of one problem share its plan body."""
    errors_seen: dict = {}

    def worker(k):
        for i in range(2 * len(PROBLEMS)):
            index = (k + i) % len(PROBLEMS)
            batch, options = _batch(index, seed=100 * k + i)
            if i % 2:
                out = portattn.attention(batch.q, batch.cache, batch.metadata,
                                         backend="torch_ref", validate=False, **options)
            else:
                plan = portattn.plan(batch.metadata, num_q_heads=batch.q.shape[1],
                                     dtype=batch.q.dtype, cache=batch.cache,
                                     backend="torch_ref", validate=False, **options)
                out = plan.run(batch.q, batch.cache)
            errors_seen[k, i] = _check(batch, options, out)

    assert not errors_in_threads(worker, THREADS)
    assert len(errors_seen) == THREADS * 2 * len(PROBLEMS)
    assert planning.cache_info()["bodies"] == len(PROBLEMS)


def test_threads_share_one_metadata_with_their_own_layers():
    """One batch's metadata (and plan) for every thread; each thread its own layers:
    caches of one structure with different values, and different q."""
    batch, _ = _batch(0, seed=7)
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=F32, cache=batch.cache,
                         backend="torch_ref", validate=False)

    def worker(k):
        gen = torch.Generator().manual_seed(k)
        for i in range(12):
            s = 0.5 + 0.1 * k + 0.01 * i
            cache = PagedKVCache(batch.cache.key_cache * s, batch.cache.value_cache * s)
            q = torch.randn(batch.q.shape, generator=gen)
            if (k + i) % 2:
                out = plan.run(q, cache)
            else:
                out = portattn.attention(q, cache, batch.metadata, backend="torch_ref",
                                         validate=False)
            expected = dense_attention(q, [x * s for x in batch.keys],
                                       [v * s for v in batch.values], batch.query_lens)
            assert relative_error(out, expected) < TOLERANCE[F32]

    checked = planning.stats["checked"]
    assert not errors_in_threads(worker, THREADS)
    assert planning.cache_info()["bodies"] == 1 and len(planning.memo) == 1
    # one check per structure, give or take threads that raced on the first call
    assert planning.stats["checked"] - checked <= 2 * THREADS


def test_concurrent_first_use_and_eviction_with_tiny_memos(monkeypatch):
    """Bodies, metadata entries and per-entry calls evicted while other threads use
    them: results stay right and the memos stay within their (tiny) bounds."""
    monkeypatch.setattr(planning.bodies, "capacity", 2)
    monkeypatch.setattr(planning.memo, "capacity", 2)
    monkeypatch.setattr(planning, "CALLS_PER_ENTRY", 2)
    monkeypatch.setattr(decision_cache, "capacity", 3)
    decision_cache.clear()
    batches = [_batch(i, seed=i) for i in range(len(PROBLEMS))]

    def worker(k):
        for i in range(3 * len(PROBLEMS)):
            batch, options = batches[(k * 3 + i) % len(batches)]
            out = portattn.attention(batch.q, batch.cache, batch.metadata,
                                     backend="torch_ref", validate=False, **options)
            _check(batch, options, out)

    assert not errors_in_threads(worker, THREADS)
    assert len(planning.bodies.entries) <= 2 and len(planning.memo) <= 2
    assert len(decision_cache) <= 3
    assert all(len(calls) <= 2 for calls, _ in planning.memo.entries.values())


def test_memos_stay_bounded_after_thousands_of_problems(monkeypatch):
    monkeypatch.setattr(planning, "_STRUCTURE_LIMIT", 256)
    monkeypatch.setattr(announced, "capacity", 256)
    monkeypatch.setattr(decision_cache, "capacity", 128)
    metadata = AttentionMetadata.from_lengths([1], [3], [[0]])
    q_by_heads = {h: torch.randn(1, 2 * h, 16) for h in (1, 2, 3)}
    refs = []
    for i in range(1500):
        heads, block = 1 + i % 3, 1 + (i // 3) % 20
        k = torch.randn(1, block, heads, 16)
        cache = PagedKVCache(k, k.clone())
        # a new scale each call: a new body (and decision) each call
        portattn.attention(q_by_heads[heads], cache, metadata, scale=0.1 + 1e-4 * i,
                           backend="torch_ref", validate=False)
        if i % 300 == 0:
            refs += [weakref.ref(cache), weakref.ref(cache.key_cache)]
    del cache, k
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    assert len(planning.bodies.entries) <= planning.BODY_CAPACITY
    assert len(planning.memo) == 1
    assert len(metadata.__dict__["_portattn_calls"]) <= planning.CALLS_PER_ENTRY
    assert len(planning._structure_ids) <= 256
    assert len(decision_cache) <= 128 and len(announced._seen) <= 256
    info = planning.cache_info()
    assert info["bodies"] == len(planning.bodies.entries) and info["bodies_made"] >= 1500


def _quantized_and_packed_caches():
    fp8 = make_paged_batch([1, 2], [9, 5], num_q_heads=4, num_kv_heads=2, head_size=16,
                           quant=KVQuant.fp8_per_tensor(0.05, 0.07), dtype=F32)
    int8 = make_paged_batch([1, 2], [9, 5], num_q_heads=4, num_kv_heads=2, head_size=16,
                            quant=KVQuant.int8_per_token_head(), dtype=F32)
    packed = make_paged_batch([1, 2], [9, 5], num_q_heads=4, num_kv_heads=2, head_size=32,
                              head_size_v=16, dtype=F32)
    return [_hinted(b) for b in (fp8, int8, packed)]


@pytest.mark.parametrize("kind", ["fp8", "int8", "packed"])
def test_a_dropped_cache_is_freed_after_every_path(kind):
    """attention (memo hit and miss), plan.run, and a call that raised (its traceback
    went out of scope): nothing portattn keeps holds the cache or its tensors."""
    batch = _quantized_and_packed_caches()[["fp8", "int8", "packed"].index(kind)]
    cache = batch.cache
    q, metadata = batch.q, batch.metadata
    plan = portattn.plan(metadata, num_q_heads=4, dtype=F32, cache=cache,
                         backend="torch_ref", validate=False)
    for _ in range(2):
        _check(batch, {}, portattn.attention(q, cache, metadata, backend="torch_ref",
                                             validate=False))
        _check(batch, {}, plan.run(q, cache))
    with pytest.raises(InputError):
        portattn.attention(q, cache, metadata, out=torch.empty(1), backend="torch_ref",
                           validate=False)
    with pytest.raises(InputError):
        plan.run(q[:, :2], cache)
    refs = [weakref.ref(t) for t in (cache, cache.key_cache, cache.value_cache,
                                     cache.k_scale_cache, cache.v_scale_cache)
            if t is not None]
    del cache, batch
    gc.collect()
    assert [r() for r in refs if r() is not None] == []
    # the plan and the memo still serve the next layer's cache
    assert len(planning.memo) == 1 and len(planning.bodies.entries) == 1


def test_a_finalizer_during_clear_or_eviction_is_harmless(monkeypatch):
    """A metadata tensor may die (its finalizer dropping its entry) while the memo is
    being cleared or is evicting: gc runs on any allocation and the lock is reentrant."""
    memo = planning._MetadataMemo(capacity=3)
    metas = [AttentionMetadata.from_lengths([1], [3 + i], [[0]]) for i in range(3)]
    for i, meta in enumerate(metas):
        memo.put(meta, "key", i)
    forget = planning._MetadataMemo._forget
    dying = [(memo.token(metas[2]), memo.find(metas[2]))]  # what its finalizer passes

    def forget_while_a_tensor_dies(entry):
        if dying:  # the first entry forgotten: meanwhile the third one's tensor dies
            memo._drop(*dying.pop())
        forget(entry)

    monkeypatch.setattr(memo, "_forget", forget_while_a_tensor_dies)
    memo.clear()
    assert len(memo) == 0 and all(not m.__dict__["_portattn_calls"] for m in metas)

    for i, meta in enumerate(metas):
        memo.put(meta, "key", i)
    dying.append((memo.token(metas[1]), memo.find(metas[1])))
    newest = AttentionMetadata.from_lengths([1], [9], [[0]])
    memo.put(newest, "key", 3)  # evicts metas[0]
    assert len(memo) == 2 and memo.find(metas[2])["key"] == 2 and memo.find(newest)["key"] == 3


def test_device_scalars_are_kept_for_good_and_bounded(monkeypatch):
    """A float scale's device tensor may be captured in a CUDA graph, which reads its
    address at every replay: past the bound, new values get a fresh tensor per call
    instead of evicting (freeing) one a graph may hold; one made while a graph is
    captured (its fill runs at replay only) is not kept."""
    from portattn.kernels import scalars

    cpu = torch.device("cpu")
    memo = scalars._DeviceScalars()
    monkeypatch.setattr(memo, "capacity", 4)
    kept = [memo.get(0.5 + i, cpu, "k") for i in range(4)]
    past = memo.get(10.0, cpu, "k")
    assert float(past) == 10.0 and memo.get(10.0, cpu, "k") is not past
    assert all(memo.get(0.5 + i, cpu, "k") is t for i, t in enumerate(kept))
    assert memo.get(0.5, cpu, "v") is not kept[0] and len(memo) == 4

    def worker(k):
        for i in range(50):
            assert float(fresh.get(0.25 * (k + i % 5), cpu, "q")) == 0.25 * (k + i % 5)

    fresh = scalars._DeviceScalars()
    assert not errors_in_threads(worker, THREADS)
    assert len(fresh) == len({0.25 * (k + i) for k in range(THREADS) for i in range(5)})

    monkeypatch.setattr(scalars, "_capturing", lambda device: True)
    during_capture = scalars._DeviceScalars()
    assert float(during_capture.get(2.0, cpu, "out")) == 2.0 and len(during_capture) == 0


def test_device_scalars_of_equal_numbers_are_one_tensor():
    """An int, a NumPy float or a 0-d array equal to a float scale reads the float's
    tensor (one entry per value, so a relaunch recorded with one binds the other), and a
    value of another role or size is another tensor."""
    import numpy as np

    from portattn.kernels import scalars

    cpu = torch.device("cpu")
    memo = scalars._DeviceScalars()
    two = memo.get(2.0, cpu, "k")
    assert float(two) == 2.0 and two.dtype == torch.float32
    assert memo.get(2, cpu, "k") is two and memo.get(np.float64(2.0), cpu, "k") is two
    assert memo.get(np.array(2.0), cpu, "k") is two  # unhashable: keyed by its float
    assert memo.kept(2, cpu, "k") and memo.kept(np.array(2.0), cpu, "k")
    quarter = memo.get(np.float32(0.25), cpu, "k")
    assert float(quarter) == 0.25 and quarter is not two
    assert memo.get(2.0, cpu, "v") is not two and len(memo) == 3


def test_a_relaunch_reads_the_memo_tensor_of_each_scale(monkeypatch):
    """The runner's scale inputs (read on every relaunch of a quantized call): a float
    in the memo is its role's tensor on q's device, found by a lookup alone; a float not
    there yet, an int or a NumPy float is what the memo's ``get`` gives; a tensor passes
    through; None stays None."""
    import numpy as np

    from portattn.backends import unified_runner
    from portattn.kernels import scalars

    memo = scalars._DeviceScalars()
    monkeypatch.setattr(unified_runner, "device_scalars", memo)
    monkeypatch.setattr(unified_runner, "_find_scalar", memo.find)
    monkeypatch.setattr(unified_runner, "_find_on_queue", memo.find_on_queue)
    q = torch.randn(3, 4, 8)
    read = unified_runner._scale_input
    k = read(0.75, q, "k")  # not in the memo yet: made by get, then found
    assert float(k) == 0.75 and k.device == q.device and len(memo) == 1
    assert read(0.75, q, "k") is k and memo.get(0.75, q.device, "k") is k
    v = read(0.75, q, "v")
    assert v is not k and float(v) == 0.75 and len(memo) == 2
    assert read(np.float64(0.75), q, "k") is k and read(3, q, "out") is read(3.0, q, "out")
    scale = torch.full((1,), 2.5)
    assert read(scale, q, "k") is scale and read(None, q, "q") is None


def test_device_scalars_are_one_tensor_per_stream(monkeypatch):
    """A float scale's tensor is filled on the stream that made it, with no sync: an eager
    call on another stream must not read it (its kernels could run before the fill), so
    each stream gets and keeps its own, and a relaunch's scale input on a stream is that
    stream's tensor; a CUDA graph capture binds the one made first. Streams are simulated
    (their handle) on CPU tensors."""
    from portattn.backends import unified_runner
    from portattn.kernels import scalars

    current = {"stream": 7}
    monkeypatch.setattr(scalars, "stream_key", lambda device: current["stream"])
    monkeypatch.setattr(unified_runner, "stream_key", lambda device: current["stream"])
    monkeypatch.setattr(scalars, "cuda_index", lambda device: 0)  # as on CUDA device 0
    memo = scalars._DeviceScalars()
    monkeypatch.setattr(unified_runner, "device_scalars", memo)
    monkeypatch.setattr(unified_runner, "_find_scalar", memo.find)
    monkeypatch.setattr(unified_runner, "_find_on_queue", memo.find_on_queue)
    cpu, q = torch.device("cpu"), torch.randn(2, 4, 8)
    on_7 = memo.get(0.5, cpu, "k")
    assert memo.kept(0.5, cpu, "k") and unified_runner._scale_input(0.5, q, "k") is on_7
    current["stream"] = 9
    assert not memo.kept(0.5, cpu, "k")  # not made on this stream yet
    on_9 = unified_runner._scale_input(0.5, q, "k")
    assert on_9 is not on_7 and float(on_9) == 0.5 and len(memo) == 2
    assert memo.get(0.5, cpu, "k") is on_9 and memo.kept(0.5, cpu, "k")
    current["stream"] = 7
    assert memo.get(0.5, cpu, "k") is on_7 and unified_runner._scale_input(0.5, q, "k") is on_7
    # a relaunch passes the device and stream it holds: each stream's own tensor, whatever
    # stream is current (CPU tensors: no CUDA index); a stream not met yet asks as above
    read = unified_runner._scale_input
    assert read(0.5, q, "k", 0, 9) is on_9 and read(0.5, q, "k", 0, 7) is on_7
    assert read(0.5, q, "k", 1, 9) is on_7  # another device's key: q's current stream
    assert read(0.5, q, "k", 0, 13) is on_7 and len(memo) == 2
    assert read(0.5, q, "k") is on_7  # a recording (neither): q's current stream
    # a graph captured on a stream of its own binds the first tensor made for the value
    # (not a fresh one refilled at every replay); a value never met eagerly gets the
    # graph's own, not kept
    monkeypatch.setattr(scalars, "_capturing", lambda device: True)
    current["stream"] = 11
    assert memo.kept(0.5, cpu, "k") and memo.get(0.5, cpu, "k") is on_7
    assert unified_runner._scale_input(0.5, q, "k") is on_7
    assert not memo.kept(0.5, cpu, "v") and memo.get(0.5, cpu, "v") is not on_7
    assert len(memo) == 2


def test_relaunch_keys_name_a_cuda_device(monkeypatch):
    """Only CUDA devices' tensors are kept under (role, value, index, stream), the key a
    relaunch passes: a caller with no index or stream (None, as a recording reads) never
    finds another device's tensor; a bare "cuda" device is keyed as the current GPU's
    index (the default stream's handle is 0 on every GPU)."""
    from portattn.kernels import scalars

    memo = scalars._DeviceScalars()
    cpu = torch.device("cpu")
    made = memo.get(0.5, cpu, "k")
    assert memo.find(("k", 0.5, cpu, None)) is made
    assert memo.find_on_queue(("k", 0.5, None, None)) is None and not memo._on_queue
    monkeypatch.setattr(scalars, "cuda_index", lambda device: 3)
    assert scalars._indexed(torch.device("cuda")) == torch.device("cuda", 3)
    assert scalars._indexed(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert scalars._indexed(cpu) == cpu


def test_the_stream_key_is_none_off_cuda():
    from portattn.devices import stream_key

    assert stream_key(torch.device("cpu")) is None


def test_clearing_the_shared_workspaces_waits_for_a_take():
    """``take`` counts the workspaces, then evicts the oldest: a clear from another
    thread in between made ``next(iter(...))`` raise StopIteration inside a call."""
    from portattn.backends.unified_runner import Workspaces

    workspaces = Workspaces()
    workspaces["stream"] = torch.zeros(1)
    with workspaces._lock:  # a take in progress
        clearing = threading.Thread(target=workspaces.clear)
        clearing.start()
        clearing.join(0.2)
        assert clearing.is_alive() and len(workspaces) == 1
    clearing.join(10)
    assert not clearing.is_alive() and len(workspaces) == 0


def test_the_descriptor_gate_memory_cleared_meanwhile(monkeypatch):
    """``check_variant`` looks its answer up once: a clear between a membership test
    and the read raised KeyError."""
    from portattn.capabilities import kv_descriptor_gate as gate

    class ClearedAfterTheTest(dict):
        def __contains__(self, key):
            found = super().__contains__(key)
            self.clear()  # another thread's gate.clear()
            return found

    caps = portattn.probe()
    variant = {"v": 1}
    key = gate._text_key(gate.machine_key(caps), variant)
    monkeypatch.setattr(gate, "_MEMORY", ClearedAfterTheTest({key: {"ok": True,
                                                                     "reason": ""}}))
    assert gate.check_variant(caps, variant, "cpu") == {"ok": True, "reason": "",
                                                        "origin": "memory"}
