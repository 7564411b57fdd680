"""A kernel that fails inside Triton (it passed every check, then Triton could not
compile or launch it): the failure is remembered, an automatically routed call goes to
the next backend with a warning and the oracle's result, a forced backend and a held plan
raise ``UnsupportedError`` naming it, the failed body is not compiled again; only
Triton's failures to compile or launch count (``launch_failures.raised_by_triton``)."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch

import portattn
from portattn import UnsupportedError, planning
from portattn.dispatch import launch_failures, priorities
from portattn.dispatch.selector import decision_cache
from portattn.testing import dense_attention, make_paged_batch, relative_error

pytestmark = pytest.mark.interpreter
PTXAS = "PTXAS error: Internal Triton PTX codegen error: ptxas fatal: Unresolved extern"


@pytest.fixture
def failing_kernels(monkeypatch):
    """Our Triton runner raises as a Triton that cannot compile the kernel would, and
    that exception counts as Triton's (under the interpreter nothing does)."""
    from portattn.backends.unified_runner import UnifiedRunner

    calls = []

    def fails(self, *args, **kwargs):
        calls.append(self)
        raise RuntimeError(PTXAS)

    monkeypatch.setattr(UnifiedRunner, "__call__", fails)
    monkeypatch.setattr(launch_failures, "raised_by_triton",
                        lambda exc: isinstance(exc, RuntimeError) and PTXAS in str(exc))
    # auto routing on this CPU tries our kernel first, as a GPU's does
    monkeypatch.setattr(priorities, "_CPU_ORDER", ("triton_unified", *(
        name for name in priorities._CPU_ORDER if name != "triton_unified")))
    priorities.priority_list.cache_clear()
    launch_failures.clear()
    planning.clear()
    decision_cache.clear()
    yield calls
    launch_failures.clear()
    planning.clear()
    decision_cache.clear()
    priorities.priority_list.cache_clear()


def _batch():
    batch = make_paged_batch([1, 3], [40, 25], num_q_heads=4, num_kv_heads=2,
                             head_size=32, dtype=torch.float32)
    metadata = portattn.AttentionMetadata(batch.metadata.cu_seqlens_q,
                                          batch.metadata.seq_lens,
                                          batch.metadata.block_table, 3, 40)
    expected = dense_attention(batch.q, batch.keys, batch.values, [1, 3])
    return batch, metadata, expected


def test_an_auto_routed_call_goes_to_the_next_backend(failing_kernels, caplog):
    batch, metadata, expected = _batch()
    first = portattn.explain(batch.q, batch.cache, metadata)
    if first.backend != "triton_unified":
        pytest.skip(f"auto routing here picks {first.backend}, not our Triton kernel")
    out = torch.full_like(batch.q, math.nan)
    with caplog.at_level(logging.INFO, logger="portattn"):
        result = portattn.attention(batch.q, batch.cache, metadata, out=out)
    assert result is out and relative_error(out, expected) < 1e-4
    assert len(failing_kernels) == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and
              "failed inside Triton" in r.getMessage()]
    assert len(warned) == 1 and PTXAS in warned[0] and first.variant in warned[0]
    after = portattn.explain(batch.q, batch.cache, metadata)
    # the log names the backend that serves the problem class from now on
    served = [r.getMessage() for r in caplog.records if " serves " in r.getMessage()]
    assert served and served[-1].startswith(f"{after.backend} serves ")
    assert after.backend != "triton_unified"
    reasons = dict(after.considered)["triton_unified"]
    assert any("failed inside Triton" in r and PTXAS in r for r in reasons)
    again = portattn.attention(batch.q, batch.cache, metadata)  # no second try
    assert relative_error(again, expected) < 1e-4 and len(failing_kernels) == 1


def test_a_forced_backend_names_the_failure(failing_kernels):
    batch, metadata, _ = _batch()
    with pytest.raises(UnsupportedError, match="failed inside Triton") as info:
        portattn.attention(batch.q, batch.cache, metadata, backend="triton_unified")
    assert PTXAS in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(UnsupportedError, match="cannot serve this call"):  # ruled out now
        portattn.attention(batch.q, batch.cache, metadata, backend="triton_unified")
    assert len(failing_kernels) == 1


def test_a_held_plan_names_the_failure_and_a_new_plan_routes_elsewhere(failing_kernels):
    batch, metadata, expected = _batch()
    plan = portattn.plan(metadata, num_q_heads=4, dtype=torch.float32, cache=batch.cache)
    if plan.backend != "triton_unified":
        pytest.skip(f"auto routing here picks {plan.backend}, not our Triton kernel")
    for _ in range(2):  # the second call fails at once, without compiling again
        with pytest.raises(UnsupportedError, match="a new portattn.plan routes") as info:
            plan.run(batch.q, batch.cache)
        assert isinstance(info.value.__cause__, RuntimeError)
    assert len(failing_kernels) == 1
    replanned = portattn.plan(metadata, num_q_heads=4, dtype=torch.float32,
                              cache=batch.cache)
    assert replanned.backend != "triton_unified"
    assert relative_error(replanned.run(batch.q, batch.cache), expected) < 1e-4


def test_a_held_plan_whose_kernel_failed_keeps_no_cache_alive(failing_kernels):
    """The failure a plan keeps for its later calls holds no frame of the failing call: its
    q, cache and out are freed while the plan lives on (session 41's audit: the kept
    exception's traceback held them)."""
    import gc
    import weakref

    batch, metadata, _ = _batch()
    plan = portattn.plan(metadata, num_q_heads=4, dtype=torch.float32, cache=batch.cache)
    if plan.backend != "triton_unified":
        pytest.skip(f"auto routing here picks {plan.backend}, not our Triton kernel")
    cache, q = batch.cache, batch.q
    refs = [weakref.ref(t) for t in (cache, cache.key_cache, q)]
    with pytest.raises(UnsupportedError) as info:
        plan.run(q, cache)
    del info, cache, q, batch
    gc.collect()
    assert [r() is None for r in refs] == [True] * 3
    with pytest.raises(UnsupportedError, match=PTXAS[:20]):  # the failure is still told
        plan.run(torch.zeros(4, 4, 32), portattn.PagedKVCache.allocate(8, 16, 2, 32,
                                                                        dtype=torch.float32))


def test_an_out_sharing_q_memory_is_not_rerouted(failing_kernels):
    """A kernel that ran before the failing one may have written ``out``; where ``out``
    is q itself the next backend would read those rows as queries: raise instead."""
    batch, metadata, _ = _batch()
    if portattn.explain(batch.q, batch.cache, metadata).backend != "triton_unified":
        pytest.skip("auto routing here does not pick our Triton kernel")
    q = batch.q.clone()
    with pytest.raises(UnsupportedError, match="failed inside Triton"):
        portattn.attention(q, batch.cache, metadata, out=q)
    assert len(failing_kernels) == 1


def test_failures_are_kept_per_architecture():
    launch_failures.clear()
    try:
        launch_failures.record("triton_unified", "problem", "sm86", "prefill-2d",
                               RuntimeError("out of shared memory"))
        assert "prefill-2d" in launch_failures.reason("triton_unified", "problem", "sm86")
        assert launch_failures.reason("triton_unified", "problem", "sm90") is None
        assert launch_failures.reason("triton_diffkv", "problem", "sm86") is None
    finally:
        launch_failures.clear()


def test_errors_that_are_not_tritons_propagate(monkeypatch):
    """An error of ours (or CUDA out-of-memory) at a first launch is raised as it is,
    nothing recorded."""
    from portattn.backends.unified_runner import UnifiedRunner

    def ours(self, *args, **kwargs):
        raise ValueError("a bug of ours")

    monkeypatch.setattr(UnifiedRunner, "__call__", ours)
    launch_failures.clear()
    planning.clear()
    batch, metadata, _ = _batch()
    try:
        with pytest.raises(ValueError, match="a bug of ours"):
            portattn.attention(batch.q, batch.cache, metadata, backend="triton_unified")
        body = next(iter(planning.bodies.entries.values()))
        assert launch_failures.reason("triton_unified", body.problem,
                                      body.decision.arch) is None
        assert body.failed is None
    finally:
        planning.clear()


def test_raised_by_triton(monkeypatch):
    triton = pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    knobs = os.path.join(os.path.dirname(triton.__file__), "knobs.py")
    try:  # raised in a frame of Triton's package, as its ptxas lookup does
        exec(compile("raise RuntimeError('Cannot find ptxas-blackwell')", knobs, "exec"))
    except RuntimeError as exc:
        in_triton = exc
    try:
        raise RuntimeError("raised by portattn")
    except RuntimeError as exc:
        ours = exc
    try:  # Triton's launcher reporting a CUDA fault (an earlier kernel's, maybe)
        exec(compile("raise RuntimeError('Triton Error [CUDA]: an illegal memory access')",
                     knobs, "exec"))
    except RuntimeError as exc:
        cuda_error = exc
    try:  # Triton's binder refusing our argument: a bug of ours
        exec(compile("raise TypeError('unexpected keyword argument')", knobs, "exec"))
    except TypeError as exc:
        our_argument = exc
    assert launch_failures.raised_by_triton(OutOfResources(232448, 227328, "shared memory"))
    assert launch_failures.raised_by_triton(in_triton)
    assert not launch_failures.raised_by_triton(ours)
    assert not launch_failures.raised_by_triton(cuda_error)
    assert not launch_failures.raised_by_triton(our_argument)
    assert not launch_failures.raised_by_triton(torch.cuda.OutOfMemoryError("no memory"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter: nothing is Triton's
    assert not launch_failures.raised_by_triton(in_triton)
