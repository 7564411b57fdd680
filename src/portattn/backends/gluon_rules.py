"""Whether a Triton plan's long sequences run the Gluon prefill
(:mod:`portattn.kernels.gluon_prefill`) instead of staging their keys.

:func:`choose_gluon_prefill` adds ``gluon`` (the kernel's part of the plan: the fewest
queries a sequence has for the kernel to serve it) and ``gluon_reason`` to a plan that
stages (``params["stage"]``, :func:`portattn.backends.triton_kv_load.choose_staging`), so
``explain`` says which kernel serves the long prompts and why. The rule:
``PORTATTN_GLUON`` not 0; a Triton whose Gluon has Hopper's warp specialization; a
problem class the kernel serves (:func:`portattn.kernels.gluon_launch.problem_reasons`)
and, in auto, where it measured faster (``unmeasured_reasons``). ``gluon["reads"]`` says
what the kernel reads: ``"cache"`` (16-bit caches: the paged blocks themselves, no
staging) or ``"staged"`` (8-bit caches: the keys are staged as before, widened to q's
dtype, and the kernel replaces the unified kernel over the staged blocks). Tensor
strides and alignment are only known at launch
(:func:`portattn.kernels.launch.launch_staged` checks them and stages where they do not
fit). ``PORTATTN_GLUON=1`` takes the kernel wherever it can serve a staged plan (head 64
included) and turns every reason into ``UnsupportedError`` (for plans that stage: today
sm90 at block 16; the others have no part for the kernel to take) and a launch-time
reason into ``InputError``; in auto a launch that raises (a Triton whose Gluon compiles differently)
is staged instead, remembered for the process and logged once.
"""

from __future__ import annotations

import sys

from portattn.errors import UnsupportedError
from portattn.kernels import gluon_launch
from portattn.kernels.heuristics import quant_mode


def _setting() -> bool | None:
    from portattn import settings

    return settings.GLUON.value()


def choose_gluon_prefill(problem, caps, params: dict) -> dict:
    """``params`` with ``gluon`` where the Gluon prefill serves the plan's long
    sequences, and ``gluon_reason`` saying why it does or does not."""
    setting = _setting()
    if setting is False:
        return {**params, "gluon_reason": "PORTATTN_GLUON=0 forbids it"}
    if not params.get("stage"):  # nothing for the kernel to take over
        return {**params, "gluon_reason": "the plan does not stage long sequences "
                                          "(stage_reason), whose part the kernel takes"}
    reasons = gluon_launch.problem_reasons(
        arch=caps.arch, q_dtype=problem.q_dtype, kv_dtype=problem.kv_dtype,
        out_dtype=problem.out_dtype, kv_quant=problem.kv_quant,
        head_size_qk=problem.head_size_qk, head_size_v=problem.head_size_v,
        block_size=problem.block_size, sliding_window=problem.sliding_window,
        softcap=problem.softcap, alibi=problem.alibi, sinks=problem.sinks)
    if setting is not True:  # auto: only where it measured faster
        reasons += gluon_launch.unmeasured_reasons(head_size_qk=problem.head_size_qk,
                                                   block_size=problem.block_size,
                                                   kv_quant=problem.kv_quant,
                                                   sliding_window=problem.sliding_window,
                                                   softcap=problem.softcap,
                                                   alibi=problem.alibi, sinks=problem.sinks)
    reads_staged = gluon_launch.reads_staged_copy(problem.kv_quant)
    if not reads_staged and not problem.kv_rows:
        reasons.append("the cache's slots are not evenly spaced rows (e.g. K and V "
                       "interleaved per block): the kernel reads whole blocks as rows")
    if setting is not True:
        failed = gluon_failure(problem, "staged" if reads_staged else "cache")
        if failed:
            reasons.append(f"its launch failed for this class in this process: {failed}")
    if not caps.simulated:
        missing = gluon_launch.gluon_reason()
        if missing:
            reasons.append(missing)
    if reasons:
        if setting is True:
            raise UnsupportedError("PORTATTN_GLUON=1 forces the Gluon prefill, which cannot "
                                   "serve this call", {"gluon": reasons})
        return {**params, "gluon_reason": "; ".join(reasons)}
    why = ("PORTATTN_GLUON=1 forces it" if setting is True else
           "measured faster here than staging (kernels.gluon_launch)")
    if reads_staged:
        reads, what = "staged", "their staged 16-bit copy"
    else:
        reads, what = "cache", "the paged cache"
    out = {**params, "gluon": {"min_q": params["stage"]["min_q"], "reads": reads},
           "gluon_reason": f"{why}; the long sequences read {what} with TMA"}
    if setting is True:
        out["_gluon_forced"] = True
    return out


def gluon_failure(problem, reads: str) -> str | None:
    """Why the Gluon prefill's launch failed for ``problem``'s class earlier in this
    process (``kernels.launch.GLUON_FAILED``), or None. Nothing can have failed before
    the launchers were imported, so they are not imported here (that would define the
    kernels: on a Triton without what they use, the probe's reason must win over an
    import error, and a simulated profile's routing must not need the kernels)."""
    launch = sys.modules.get("portattn.kernels.launch")
    if launch is None:
        return None
    key = launch.gluon_class_key(problem.q_dtype, problem.head_size_qk, problem.block_size,
                                 problem.causal, reads, problem.sliding_window,
                                 problem.softcap, problem.alibi, problem.sinks,
                                 quant_mode(problem.kv_quant))
    return launch.GLUON_FAILED.get(key)
