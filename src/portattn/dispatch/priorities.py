"""Per-architecture priority lists: a pure, cached function of the capabilities and the
problem's class.

The dispatcher walks the list and takes the first backend with no reasons. Evidence for
the order lives in benchmarks/NOTES.md; the expected routing of every simulated profile
is checked in CI (ci/expected_routing.json).

Three parts:

* the default order per vendor (below),
* :data:`MEASURED_LEADS`: where a backend, through one of its library interfaces, was
  measured faster than the backend it goes ahead of, for one architecture and one problem
  class. A lead applies only when that interface is the one the backend would use for the
  call (``Backend.interface_for``): ``flash_attn`` goes ahead of our kernels for long
  prefill chunks only when FA4 serves the call, never because FA2 or FA3 could; and
* :data:`MEASURED_YIELDS`: the part of a lead's class where the backend it goes ahead of
  caught up (head sizes, block sizes, feature sets, and the kernel its plan must run);
  the selector drops the lead there and says so in the decision's notes.

Change a row only with a new measurement, and put its numbers in ``evidence``.
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


# ----------------------------------------------------------------- measured yields

def _features_used(problem) -> frozenset:
    """The optional score features ``problem`` uses, as ``Problem`` field names."""
    used = {name for name in ("sliding_window", "softcap", "sinks") if getattr(problem, name)}
    if problem.alibi != "none":
        used.add("alibi")
    return frozenset(used)


@dataclass(frozen=True)
class MeasuredYield:
    """Where a lead does not apply: on ``arch``, for ``problem_class``, the lead of
    ``backend`` yields to ``ahead_of`` for problems with these ``(qk, v)`` head sizes,
    cache block sizes, GQA ratios, causal or not, and sets of optional features (exactly
    one of ``feature_sets``: ``()`` none, ``("sinks",)`` sinks alone...; a combination not
    listed was not measured) whose ``ahead_of`` plan sets ``plan_param`` (the kernel that
    measured at least as fast; its numbers in ``evidence``)."""

    arch: str
    problem_class: str
    backend: str
    ahead_of: str
    heads: tuple[tuple[int, int], ...]
    block_sizes: tuple[int, ...]
    plan_param: str
    evidence: str
    feature_sets: tuple[tuple[str, ...], ...] = ((),)
    gqa_ratios: tuple[int, ...] = (4,)
    causal: bool = True

    def covers(self, problem) -> bool:
        """Whether ``problem``'s heads, block size, GQA ratio, causality and features are
        measured ones (the plan's part is checked by the selector, which makes the plan)."""
        return ((problem.head_size_qk, problem.head_size_v) in self.heads
                and problem.block_size in self.block_sizes
                and problem.gqa_ratio in self.gqa_ratios and problem.causal == self.causal
                and _features_used(problem) in {frozenset(f) for f in self.feature_sets})

    def describe(self) -> str:
        heads = "/".join(f"{qk}" if qk == v else f"{qk}x{v}" for qk, v in self.heads)
        return (f"{self.backend}'s measured lead for {self.problem_class} on {self.arch} "
                f"yields to {self.ahead_of} here: at head {heads}, block "
                f"{'/'.join(map(str, self.block_sizes))}, GQA "
                f"{'/'.join(map(str, self.gqa_ratios))}"
                f"{', causal' if self.causal else ''}, {self.ahead_of}'s "
                f"{self.plan_param} kernel measured at least as fast "
                "(dispatch.priorities.MEASURED_YIELDS)")


_H200_GLUON_H128 = (
    "H200, 2026-12-04, bf16, 32/8 heads x 128, causal, block 16, portattn.attention through "
    "each backend (FA4 for flash_attn) in one run (benchmarks/routing_bench.py), the "
    "flash_attn route's time over triton_unified's, eager / CUDA graph (> 1: ours faster): "
    "prefill 1x2048 1.91/1.06, 1x4096 1.04/1.03, 1x8192 1.03/1.04, 1x16384 1.03/0.99, "
    "4x2048 1.05/1.04, 8x4096 1.05/1.03, a 2048-query chunk over 10240 keys 1.02/1.03, "
    "beside 7 decodes 1.03/0.99, beside 63 1.08/1.22, 1100 + 127 decodes 1.17/1.15, "
    "4096 + 255 decodes 1.18/1.25, fp16 1x8192 1.02/1.04, sinks 1.02/1.00, softcap 30 "
    "1.20/1.18 (sliding windows: FA4 ahead, 0.90/0.90 at 1024, 0.94/0.99 at 4096, so they "
    "keep the lead; GQA 4 and causal only); sessions 15-17 (TFLOP/s bench, same routes): "
    "1x8192 1.01-1.06, 4x2048 0.97-1.07, 1x4096 0.95-1.04, chunk + 63 decodes 1.05-1.13")

#: Rows of :data:`MEASURED_LEADS` that yield where our own kernel caught up. Change a row
#: only with a new measurement (``benchmarks/routing_bench.py`` prints both routes).
MEASURED_YIELDS: tuple[MeasuredYield, ...] = (
    MeasuredYield("sm90", "long-chunks", "flash_attn", "triton_unified", ((128, 128),),
                  (16,), "gluon", _H200_GLUON_H128,
                  feature_sets=((), ("sinks",), ("softcap",))),
)


def yields_for(arch: str, klass: str, backend: str, problem) -> tuple[MeasuredYield, ...]:
    """The rows of :data:`MEASURED_YIELDS` that cover ``problem`` for ``backend``'s lead."""
    return tuple(row for row in MEASURED_YIELDS
                 if row.arch == arch and row.problem_class == klass and
                 row.backend == backend and row.covers(problem))


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
