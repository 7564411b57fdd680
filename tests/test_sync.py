"""The steady-state call reads no device value: checked on the CPU with
:class:`sync_spy.DeviceSyncSpy` (the GPU tier checks the same on the device with
``torch.cuda.set_sync_debug_mode("error")``)."""

from __future__ import annotations

import pytest
import torch

import portattn
from portattn.backends.base import Backend, Plan
from portattn.dispatch import decision_cache, registry
from portattn.testing import dense_attention, make_paged_batch, relative_error

from sync_spy import DeviceSyncSpy


def _batch_tensors(q, cache, metadata):
    return (q, cache.key_cache, cache.value_cache, metadata.cu_seqlens_q, metadata.seq_lens,
            metadata.block_table)


DELIBERATE_SYNCS = {
    "int": lambda t: int(t.max()),
    "item": lambda t: t[0].item(),
    "tolist": lambda t: t[1:].tolist(),
    "float": lambda t: float(t.sum()),
    "bool": lambda t: bool(t[0] > 0),
    "if": lambda t: 1 if (t == 3).any() else 0,
    "index": lambda t: [0, 1, 2, 3, 4][t[0]],
    "range": lambda t: range(t[2]),
    "nonzero": lambda t: t.nonzero(),
    "mask": lambda t: t[t > 2],
    "cpu": lambda t: t.cpu(),
    "to-cpu": lambda t: t.to("cpu"),
    "numpy": lambda t: t.numpy(),
    "equal": lambda t: torch.equal(t, t + 0),
    "format": lambda t: f"{t}",
    "repeat_interleave": lambda t: torch.repeat_interleave(t),
}


@pytest.mark.parametrize("kind", list(DELIBERATE_SYNCS))
def test_the_spy_catches_a_deliberate_sync(kind):
    t = torch.arange(1, 5, dtype=torch.int32)
    with pytest.raises(AssertionError, match="host reads of device values"):
        with DeviceSyncSpy(t):
            DELIBERATE_SYNCS[kind](t)


def test_the_spy_ignores_host_tensors_shapes_and_device_math():
    t, host = torch.arange(4), torch.arange(3)
    with DeviceSyncSpy(t) as spy:
        int(host.max()), host.tolist(), t.shape[0], t.numel(), t.stride(), t.dtype
        u = (t * 2 + 1)[1:].cumsum(0)
        torch.repeat_interleave(t, t, output_size=6)
    assert spy.reads == [] and spy.on_device(u) and not spy.on_device(host)


class NoopBackend(Backend):
    """Serves everything and launches nothing: isolates the dispatcher's own host work."""

    name = "noop"
    summary = "test double"

    def why_not(self, problem, caps):
        return []

    def plan(self, problem, caps):
        return Plan(self.name, "nothing")

    def run(self, q, cache, metadata, options, out, plan):
        out.zero_()


@pytest.fixture
def noop(monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, "noop", f"{__name__}:NoopBackend")
    registry.reset()
    decision_cache.clear()
    yield
    registry.reset()
    decision_cache.clear()


@pytest.fixture
def batch():
    return make_paged_batch([2, 1, 1], [9, 30, 17], num_q_heads=4, num_kv_heads=2,
                            head_size=32, dtype=torch.float32)


def test_steady_state_calls_read_no_device_value(noop, batch):
    """Max lengths given, value checks off: the first call (every structural check) and
    the next ones (the fast path) leave every device value alone, and so does explain."""
    with DeviceSyncSpy(_batch_tensors(batch.q, batch.cache, batch.metadata), batch.q):
        for _ in range(3):
            portattn.attention(batch.q, batch.cache, batch.metadata, backend="noop",
                               validate=False, sinks=torch.zeros(4), sliding_window=8)
        portattn.explain(batch.q, batch.cache, batch.metadata, backend="noop",
                         validate=False)


def test_the_spy_finds_the_syncs_the_contract_allows(noop, batch):
    """Without max lengths the call must read them, and value checks read the metadata:
    the spy sees both, in portattn's own code (so it can fail on the hot path)."""
    m = batch.metadata
    unbounded = portattn.AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table)
    with pytest.raises(AssertionError, match=r"(?s)Tensor.__int__ at types.py.*max"):
        with DeviceSyncSpy(_batch_tensors(batch.q, batch.cache, unbounded)):
            portattn.attention(batch.q, batch.cache, unbounded, backend="noop",
                               validate=False)
    with pytest.raises(AssertionError, match=r"Tensor.tolist at validation.py"):
        with DeviceSyncSpy(_batch_tensors(batch.q, batch.cache, m)):
            portattn.attention(batch.q, batch.cache, m, backend="noop", validate=True)


@pytest.mark.interpreter
def test_triton_unified_launcher_reads_no_device_value(batch, monkeypatch):
    """The launcher (grids, strides, scalars) reads no device value; the kernel itself
    runs in Triton's interpreter on host copies, which the spy does not count."""
    from triton.runtime.interpreter import InterpretedFunction

    spy = DeviceSyncSpy(_batch_tensors(batch.q, batch.cache, batch.metadata))
    getitem = InterpretedFunction.__getitem__  # ``kernel[grid]``, on every Triton release

    def getitem_paused(self, grid):
        launch = getitem(self, grid)

        def run_paused(*args, **kwargs):
            with spy.paused():
                return launch(*args, **kwargs)
        return run_paused

    monkeypatch.setattr(InterpretedFunction, "__getitem__", getitem_paused)
    with spy:
        for _ in range(2):
            out = portattn.attention(batch.q, batch.cache, batch.metadata,
                                     backend="triton_unified", validate=False)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    assert relative_error(out, expected) < 2e-5
