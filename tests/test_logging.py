"""The ``portattn`` logger: the backend of each new problem class at INFO, a slow path on a
GPU at WARNING, each once."""

from __future__ import annotations

import logging

import pytest
import torch

import portattn
from portattn import planning
from portattn.capabilities import probe
from portattn.dispatch import Problem, decide, decision_cache
from portattn.dispatch.announce import announced
from portattn.dispatch.routing import routing_table
from portattn.testing import make_paged_batch


def _forget_every_decision():
    """Decisions are made once per problem class; the plan caches keep whole plans (so
    they never ask the selector again), the decision cache keeps decisions."""
    planning.clear()
    decision_cache.clear()
    announced.clear()


@pytest.fixture(autouse=True)
def fresh(caplog):
    _forget_every_decision()
    caplog.set_level(logging.INFO, logger="portattn")
    yield
    _forget_every_decision()


def _records(caplog, level=None):
    return [r for r in caplog.records if r.name == "portattn"
            and (level is None or r.levelno == level)]


def test_each_new_problem_class_is_announced_once_at_info(caplog, monkeypatch):
    monkeypatch.setenv("PORTATTN_VALIDATE", "0")
    batch = make_paged_batch([2, 1], [9, 30], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=torch.float32)
    for _ in range(3):
        portattn.attention(batch.q, batch.cache, batch.metadata)
    records = _records(caplog)
    assert [r.levelno for r in records] == [logging.INFO]  # the CPU reference is normal
    message = records[0].getMessage()
    assert message.startswith("torch_ref serves up to 2 queries a sequence, float32, heads 4/2")
    assert "on cpu (automatic; variant per-sequence dense)" in message
    portattn.attention(batch.q, batch.cache, batch.metadata, softcap=5.0)  # a new class
    assert len(_records(caplog)) == 2 and "softcap" in _records(caplog)[1].getMessage()


def test_a_slow_path_on_a_gpu_warns_once_with_the_reasons(caplog):
    caps = probe(simulate="sm90")
    problem = Problem.make(head_size=264, dtype="float16")  # wider than any kernel takes
    for _ in range(2):
        decision = decide(problem, caps)
        assert decision.backend == "torch_ref"
        decision_cache.clear()  # even a re-decision does not repeat the warning
    warnings = _records(caplog, logging.WARNING)
    assert len(warnings) == 1 and not _records(caplog, logging.INFO)
    message = warnings[0].getMessage()
    assert message.startswith("slow path: torch_ref (the PyTorch reference, one sequence at "
                              "a time) serves decode, float16, heads 32/8, head size 264")
    triton_reasons = ", ".join(decision.rejected["triton_unified"])
    assert f"on sm90 because nothing faster can: triton_unified: {triton_reasons}; " in message
    assert "flash_attn: flash-attn is not installed" in message


def test_a_slow_path_warns_once_for_a_growing_decode_and_batch(caplog):
    """Problem classes that differ only in their key count or batch size (each a new
    decision) share one slow-path warning; other reasons get their own."""
    caps = probe(simulate="sm90")
    for seq_len in (600, 1200, 2400, 4800, 9600):
        for num_seqs in (1, 3, 9):
            decision = decide(Problem.make(head_size=264, dtype="float16", seq_len=seq_len,
                                           num_seqs=num_seqs), caps)
            assert decision.backend == "torch_ref"
    assert len(_records(caplog, logging.WARNING)) == 1
    # every later class still gets its line, at INFO, saying it is the slow path
    infos = [r.getMessage() for r in _records(caplog, logging.INFO)]
    assert len(infos) == 14 and all(m.startswith("torch_ref serves ") and
                                    "slow path, warned about above" in m for m in infos)
    decide(Problem.make(head_size=520, dtype="float16", seq_len=600), caps)
    warnings = _records(caplog, logging.WARNING)
    assert len(warnings) == 2 and "head size 520 is outside" in warnings[1].getMessage()


def test_a_forced_backend_is_info_and_says_who_forced_it(caplog, monkeypatch):
    caps = probe(simulate="sm90")
    decide(Problem.make(), caps, "torch_ref")
    monkeypatch.setenv("PORTATTN_BACKEND", "torch_ref")
    decide(Problem.make(), caps)
    messages = [r.getMessage() for r in _records(caplog, logging.INFO)]
    assert len(messages) == 2 and not _records(caplog, logging.WARNING)
    assert "(forced by argument;" in messages[0]
    assert "(forced by environment;" in messages[1]


def test_a_fast_choice_says_what_it_passed_over(caplog):
    caps = probe(simulate="sm90+fa3")
    decision = decide(Problem.make(dtype="float16"), caps)
    assert decision.backend == "triton_unified"
    decision = decide(Problem.make(head_size=192, head_size_v=128), caps)  # DiffKV
    assert decision.backend not in ("triton_unified", "torch_ref")
    first, second = _records(caplog)
    assert first.levelno == second.levelno == logging.INFO
    assert first.getMessage().startswith("triton_unified serves decode, float16")
    assert "passed over" not in first.getMessage()
    assert second.getMessage().startswith(f"{decision.backend} serves decode, bfloat16")
    assert "; passed over triton_unified: " in second.getMessage()


def test_listings_of_hypothetical_problems_log_nothing(caplog):
    routing_table(probe(simulate="sm90"))
    assert _records(caplog) == []


def test_a_yielded_lead_is_in_the_info_line(caplog):
    caps = probe(simulate="sm90+fa4")
    decide(Problem.make(query_len=8192, seq_len=8192), caps)  # head 128, block 16
    (record,) = _records(caplog)
    message = record.getMessage()
    assert message.startswith("triton_unified serves up to 8192 queries a sequence")
    assert "flash_attn's measured lead for long-chunks on sm90 yields to triton_unified" \
        in message
    decide(Problem.make(query_len=8192, seq_len=8192, head_size=256), caps)
    assert "yields" not in _records(caplog)[1].getMessage()


def test_a_gpu_cache_write_in_pytorch_warns_once_per_device_and_dtype(caplog):
    """The write's slow path (a GPU without fp8 conversions, or no Triton) says so once;
    called directly here (a CPU cache's write is not a slow path and never warns)."""
    from portattn import KVQuant, PagedKVCache
    from portattn.types import _warn_slow_write

    caplog.set_level(logging.INFO, logger="portattn")
    cache = PagedKVCache.allocate(2, 4, 1, 8, quant=KVQuant.fp8_per_tensor(1.0, 1.0))
    cache.write(torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.tensor([0]))
    assert not [r for r in caplog.records if "PagedKVCache.write" in r.getMessage()]
    _warn_slow_write(cache)
    _warn_slow_write(cache)
    slow = [r for r in caplog.records if "PagedKVCache.write" in r.getMessage()]
    assert [r.levelname for r in slow] == ["WARNING"]
    assert "float8_e4m3fn" in slow[0].getMessage() and "CUDA graph" in slow[0].getMessage()


def test_explain_logs_nothing_and_the_call_that_runs_is_announced(caplog, monkeypatch):
    """``explain`` runs nothing: the "serves" line belongs to the first call that does
    (it went to explain, and the real call logged nothing: session 41's audit)."""
    monkeypatch.setenv("PORTATTN_VALIDATE", "0")
    batch = make_paged_batch([2, 1], [9, 30], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=torch.float32)
    decision = portattn.explain(batch.q, batch.cache, batch.metadata, softcap=3.0)
    assert decision.backend == "torch_ref" and _records(caplog) == []
    portattn.attention(batch.q, batch.cache, batch.metadata, softcap=3.0)
    records = _records(caplog)
    assert len(records) == 1 and records[0].getMessage().startswith("torch_ref serves ")
