"""The bench's timing harness: what can be checked without a GPU (the flush choice; the
table says which flush its kernel-only column used)."""

import pytest

from portattn.bench.report import format_table
from portattn.bench.timing import L2_FLUSHES, GraphTimer


def test_graph_timer_rejects_an_unknown_flush_before_allocating():
    with pytest.raises(ValueError, match=r"flush: expected one of \('zero', 'read'\), got 'clean'"):
        GraphTimer(flush="clean")  # on a CPU machine: raised before any CUDA allocation


@pytest.mark.parametrize("flush", [None, *L2_FLUSHES])
def test_the_table_names_a_clean_l2_flush(flush):
    report = {"gpu": "test", "torch": "t", "triton": "t", "ceilings": {}, "cases": []}
    if flush is not None:
        report["l2_flush"] = flush
    header = format_table(report).splitlines()[1]
    if flush == "read":
        assert "kernel only, L2 flush: read" in header
    else:  # older reports carry no flush: the bench's zeroing one
        assert "CUDA graph, kernel only" in header and "L2 flush" not in header
