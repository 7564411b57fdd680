"""The bench's timing harness: what can be checked without a GPU (the flush choice; the
table says which flush its kernel-only column used)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from portattn.bench.report import format_table
from portattn.bench.timing import L2_FLUSHES, GraphTimer, evict_l2


def test_graph_timer_rejects_an_unknown_flush_before_allocating():
    with pytest.raises(ValueError, match=r"flush: expected one of \('zero', 'read'\), got 'clean'"):
        GraphTimer(flush="clean")  # on a CPU machine: raised before any CUDA allocation
    buffer = torch.ones(64, dtype=torch.int32)
    with pytest.raises(ValueError, match="flush: expected one of"):
        evict_l2(buffer, torch.zeros((), dtype=torch.int32), "clean")
    assert torch.equal(buffer, torch.ones(64, dtype=torch.int32))  # nothing evicted


@pytest.mark.parametrize("flush", [None, *L2_FLUSHES])
def test_the_table_names_a_clean_l2_flush(flush):
    report = {"gpu": "test", "torch": "t", "triton": "t", "ceilings": {}, "cases": []}
    if flush is not None:
        report["l2_flush"] = flush
    header = format_table(report).splitlines()[1]
    assert "CUDA graph, kernel only" in header
    if flush == "read":
        assert "kernel only, L2 read" in header
    else:  # older reports carry no flush: the bench's zeroing one
        assert "L2" not in header


@pytest.mark.parametrize("flush", L2_FLUSHES)
def test_the_l2_eviction_touches_the_buffer_once_with_no_copy(flush):
    """``zero`` zeroes the buffer; ``read`` leaves it as it was and reads it in place: no
    converted copy of it (an int64 sum of an int32 buffer makes one as large again)."""
    buffer = torch.randint(1, 1 << 20, (1 << 20,), dtype=torch.int32)
    before = buffer.clone()
    sink = torch.full((), -1, dtype=torch.int32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        evict_l2(buffer, sink, flush)
    events = prof.key_averages()
    assert max(e.cpu_memory_usage for e in events) < buffer.numel()  # bytes: < 1/4 of it
    assert not any("_to_copy" in e.key for e in events)
    if flush == "zero":
        assert not buffer.any()
    else:
        assert torch.equal(buffer, before)
        total = int(before.long().sum()) % (1 << 32)  # the int32 sum, wrapped
        assert int(sink) == (total - (1 << 32) if total >= 1 << 31 else total)
