"""Per-architecture priority lists: a pure, cached function of the capabilities and the
problem's class.

The dispatcher walks the list and takes the first backend with no reasons. Evidence for
the order lives in benchmarks/NOTES.md; the expected routing of every simulated profile
is checked in CI (ci/expected_routing.json).

Two parts:

* the default order per vendor (below), and
* :data:`MEASURED_LEADS`: where a backend, through one of its library interfaces, was
  measured faster than the backend it goes ahead of, for one architecture and one problem
  class. A lead applies only when that interface is the one the backend would use for the
  call (``Backend.interface_for``): ``flash_attn`` goes ahead of our kernels for long
  prefill chunks only when FA4 serves the call, never because FA2 or FA3 could. Change a
  row only with a new measurement, and put its numbers in ``evidence``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from portattn.capabilities import Capabilities

# NVIDIA: our Triton kernels first (they match cuDNN on decode, and on the H200 beat or
# equal flash-attn 2's paged paths on every PERFORMANCE.md shape at block 16 and 256,
# benchmarks/NOTES.md), flash-attn's paged kernels next for what they do not serve (FA3,
# where installed, is not measured yet), then the FA2 gather path (a copy of the K/V
# first), the reference last. AMD: flash-attn is CUDA-only. CPU: the reference is the
# default (the Triton interpreter is for testing kernels, far slower).
_NVIDIA_ORDER = ("triton_unified", "triton_diffkv", "flash_attn", "flash_attn_gather",
                 "torch_ref")
_AMD_ORDER = ("triton_unified", "triton_diffkv", "torch_ref")
_CPU_ORDER = ("torch_ref", "triton_unified", "triton_diffkv")

# ----------------------------------------------------------------- problem classes

#: Smallest bucketed ``Problem.max_seqlen_q`` of the class "long-chunks". Buckets are powers
#: of two, so 2048 means a longest chunk of more than 1024 queries. Measured so far: chunks
#: of 2048, 4096 and 8192 (PERFORMANCE.md); lower it only with shorter chunks measured.
LONG_CHUNK_BUCKET = 2048


def problem_class(problem) -> str:
    """``decode`` (one query per sequence at most), ``long-chunks`` (a chunk of more than
    ``LONG_CHUNK_BUCKET // 2`` queries: prefill, or a mixed batch with such a chunk), else
    ``short-chunks`` (spec-decode, small chunks)."""
    if problem.max_seqlen_q <= 1:
        return "decode"
    return "long-chunks" if problem.max_seqlen_q >= LONG_CHUNK_BUCKET else "short-chunks"


# ----------------------------------------------------------------- measured leads


@dataclass(frozen=True)
class MeasuredLead:
    """On ``arch``, for ``problem_class``, ``backend`` through ``interface`` goes just
    ahead of ``ahead_of`` (the numbers that justify it are in ``evidence``)."""

    arch: str
    problem_class: str
    backend: str
    interface: str
    ahead_of: str
    evidence: str


_H200_PREFILL = ("H200, 2026-12-02, bf16, 32/8 heads x 128, causal, paged at block 16, one "
                 "run: FA4 554 vs ours 345 TFLOP/s (prefill 1x8192), 448 vs 266 (4x2048), "
                 "516 vs 318 (1x4096); with our staged prefill (session 7: staged keys read as "
                 "rows of host-built descriptors, one run) ours at 0.90 / 0.77 / 0.82 of "
                 "FA4's speed (head 64: 0.90 / 0.81 / 0.75, head 256: 0.78 / 0.70 / 0.72); "
                 "session 8 (2026-12-03, one run): 0.94 / 0.80 / 0.79, a 2048-query chunk "
                 "beside 63 decodes 1.00 (head 64: 0.93 / 0.82 / 0.80, head 256: 0.81 / "
                 "0.75 / 0.76), so FA4 still leads or ties; at block 128 FA4 605/495/593 "
                 "(PERFORMANCE.md); "
                 "DiffKV 192/128 prefill 1x8192: FA4 1.03 ms vs ours 2.01 ms at block 16, "
                 "0.98 vs 1.94 ms at block 128 (benchmarks/results/"
                 "h200-2026-12-02-fa4-decode-summary.txt)")

#: THE TABLE TO UPDATE FROM MEASUREMENTS (ci/gpu_fa4.sh prints the numbers it rests on).
#: Measured and NOT a lead (kept here so the next measurement has its baseline): decode
#: on the H200, FA4 paged block 16 vs ours: 155 vs 84-98 us (8x8192), 298 vs 258 us
#: (32x8192), 1257 vs 999 us (128x8192), 135 vs 26 us (1x8192), 441 vs 54 us (1x32768),
#: spec-decode 314 vs 260 us (32 x 4 @ 8192), 181 vs 87 us (16 x 4 @ 4096); at block 128
#: the same order except spec 16 x 4 @ 4096 (83 vs 84 us, even); DiffKV decode ours
#: 0.77-0.99x FA4's time: decode and spec-decode stay ours.
MEASURED_LEADS: tuple[MeasuredLead, ...] = (
    MeasuredLead("sm90", "long-chunks", "flash_attn", "fa4", "triton_unified", _H200_PREFILL),
    MeasuredLead("sm100", "long-chunks", "flash_attn", "fa4", "triton_unified",
                 "not measured on sm100 (no Blackwell GPU here): FA4's Blackwell kernels "
                 "are its primary target, so the H200 prefill lead is carried over; "
                 + _H200_PREFILL),
)


def leads_for(arch: str, klass: str) -> tuple[MeasuredLead, ...]:
    """The rows of :data:`MEASURED_LEADS` for this architecture and problem class."""
    return tuple(lead for lead in MEASURED_LEADS
                 if lead.arch == arch and lead.problem_class == klass)


def _base_order(caps: Capabilities) -> tuple[str, ...]:
    if caps.device_type == "cpu":
        return _CPU_ORDER
    if caps.vendor == "nvidia":
        return _NVIDIA_ORDER
    return _AMD_ORDER


@functools.lru_cache(maxsize=256)
def priority_list(caps: Capabilities, klass: str | None = None,
                  serving: frozenset = frozenset()) -> tuple[str, ...]:
    """The order in which backends are tried.

    ``klass``: the problem's class (:func:`problem_class`; None = the default order).
    ``serving``: the ``(backend, interface)`` pairs that would serve the problem (the
    selector asks each backend named by a lead); a lead moves its backend just ahead of
    ``ahead_of`` only when its pair is in ``serving``.
    """
    order = list(_base_order(caps))
    if klass is None:
        return tuple(order)
    for lead in leads_for(caps.arch, klass):
        if (lead.backend, lead.interface) not in serving or lead.ahead_of not in order:
            continue
        if lead.backend in order:
            if order.index(lead.backend) < order.index(lead.ahead_of):
                continue  # already ahead
            order.remove(lead.backend)
        order.insert(order.index(lead.ahead_of), lead.backend)
    return tuple(order)
