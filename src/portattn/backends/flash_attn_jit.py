"""FA4's just-in-time compiles: which kernel configurations this process has already run.

FA4 (``flash_attn.cute``) builds a kernel the first time it meets a configuration (about
4 s on an H200) and keeps it for the rest of the process (and on disk across processes
only with ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``). The ``flash_attn`` backend records
each configuration it runs through FA4 here, so ``portattn.explain`` can say whether the
next call will compile.

A configuration is a tuple of plain values (dtype names, ints, bools, the softcap value),
never a tensor, so this set holds no reference to a cache or a batch. It is at least as
fine as FA4's own compile key for everything portattn varies (dtype, head sizes, GQA
ratio, causal/window, softcap value, sink dtype, fp8, the query rows of the longest
sequence up to a few tiles, more than 256 sequences), so "already compiled" is never said
of a call that compiles. It is finer in two places: every block size counts (FA4 only
tells "a page is one key tile" from "it is not") and query rows are told apart below 512;
there ``explain`` may announce a compile that FA4 then skips.
"""

from __future__ import annotations

import logging
import threading

from portattn import settings

COMPILE_SECONDS_H200 = 4  # measured per new configuration on the H200 (DEVICE.md)
DISK_CACHE_VARIABLE = settings.FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED.name
QUERY_ROWS_CAP = 512  # past this many (query x GQA) rows FA4's tile plan no longer changes
MANY_SEQUENCES = 256  # FA4 adds a batch lookup above this many sequences

logger = logging.getLogger("portattn")


def plan_configuration(problem, arch: str) -> tuple:
    """The part of a configuration a :class:`Problem` fixes (kept in the plan)."""
    return (arch, str(problem.q_dtype), str(problem.kv_dtype), problem.head_size_qk,
            problem.head_size_v, problem.gqa_ratio, problem.causal, problem.sliding_window,
            problem.block_size, min(problem.max_seqlen_q * problem.gqa_ratio, QUERY_ROWS_CAP),
            problem.num_seqs > MANY_SEQUENCES)


def call_configuration(planned: tuple, softcap: float | None, sinks) -> tuple:
    """Add what the options decide: the softcap value (compiled into FA4's score_mod) and
    the sinks' dtype (``sinks``: a tensor or None; only its dtype is kept)."""
    return planned + (softcap, None if sinks is None else str(sinks.dtype))


class CompiledConfigurations:
    """A thread-safe set of configurations that have run through FA4 in this process."""

    def __init__(self) -> None:
        self._seen: set[tuple] = set()
        self._lock = threading.Lock()

    def __contains__(self, configuration: tuple) -> bool:
        return configuration in self._seen

    def record(self, configuration: tuple) -> bool:
        """Remember ``configuration``; True the first time (the call just compiled)."""
        if configuration in self._seen:
            return False
        with self._lock:
            if configuration in self._seen:
                return False
            self._seen.add(configuration)
        logger.info("FA4 compiled a kernel for a new configuration %s (about %d s on an "
                    "H200); later calls with it reuse it", configuration,
                    COMPILE_SECONDS_H200)
        return True

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def __len__(self) -> int:
        return len(self._seen)


compiled = CompiledConfigurations()


def compile_note(configuration: tuple | None) -> str:
    """One sentence for ``explain``: will the next call with this configuration compile?"""
    if configuration is not None and configuration in compiled:
        return ("FA4 JIT: this configuration already ran in this process; its kernel is "
                "compiled")
    disk = (settings.FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED.raw() or "").strip() == "1"
    return ("FA4 JIT: the first call with this configuration in this process compiles a "
            f"kernel (about {COMPILE_SECONDS_H200} s on an H200; warm up before capturing a "
            "CUDA graph)" + ("; FA4's disk cache is on, so it may load instead"
                             if disk else f"; {DISK_CACHE_VARIABLE}=1 keeps compiled kernels "
                             "on disk for later processes"))
