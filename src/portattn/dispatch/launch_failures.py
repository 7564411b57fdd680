"""Backends whose kernel failed at its first launch in this process, by problem.

A backend that passed every check (the probe's ``triton_kernels``, its own reasons) can
still fail when its kernel is first compiled or launched for a problem: a Triton release
that cannot compile this variant, a shared-memory estimate that is off on this GPU, a
missing tool. Such a failure is remembered here (:func:`record`), the dispatcher rules
that backend out for that problem for the rest of the process (:func:`reason`, one of
its reasons), and decisions and plans made before are forgotten:

* a call routed automatically is decided again at once and served by the next backend,
  with a warning naming the failure (``planning.attend``);
* a call that forced the backend (``backend=`` or ``PORTATTN_BACKEND``), and a plan the
  caller holds, raise :class:`~portattn.errors.UnsupportedError` naming the backend, its
  variant and the failure, chained from Triton's exception (a new ``portattn.plan``
  routes elsewhere).

Only exceptions raised from inside Triton count (:func:`raised_by_triton`): our own
errors, CUDA out-of-memory and anything under the Triton interpreter (a testing tool,
where rerouting would hide a kernel bug from the tests) propagate unchanged.
"""

from __future__ import annotations

import os
import sys
import threading

from portattn.capabilities._text import one_line

_FAILED: dict[tuple, str] = {}
_LOCK = threading.Lock()


class FirstLaunchFailed(Exception):
    """Raised by a plan body whose first launch failed inside Triton; ``cause`` is
    Triton's exception (also ``__cause__``)."""

    def __init__(self, body, cause: BaseException):
        super().__init__(one_line(cause))
        self.body = body
        self.cause = cause


def raised_by_triton(exc: BaseException) -> bool:
    """Whether ``exc`` comes from Triton compiling or launching a kernel: a Triton
    exception type (``CompilationError``, ``OutOfResources``...), or one raised in a frame
    of Triton's package (its launcher, ``Cannot find ptxas``...). Never under the
    interpreter (see the module doc)."""
    from portattn.settings import TRITON_INTERPRET

    triton = sys.modules.get("triton")
    if triton is None or TRITON_INTERPRET.value():
        return False
    if type(exc).__module__.split(".")[0] == "triton":
        return True
    package = os.path.dirname(os.path.abspath(getattr(triton, "__file__", "") or ""))
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not package:
        return False
    where = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return where.startswith(package + os.sep)


def record(backend: str, problem, variant: str, cause: BaseException) -> str:
    """Remember that ``backend``'s kernel ``variant`` failed at its first launch for
    ``problem``; forget the decisions and plans made before. Returns the reason the
    dispatcher now gives for it."""
    from portattn.capabilities.cache import forget_decisions

    why = (f"its kernel ({variant}) failed at its first launch in this process: "
           f"{one_line(cause)}")
    with _LOCK:
        _FAILED[(backend, problem)] = why
    forget_decisions()
    return why


def reason(backend: str, problem) -> str | None:
    """Why ``backend`` is ruled out for ``problem`` in this process, or None."""
    return _FAILED.get((backend, problem)) if _FAILED else None


def clear() -> None:
    """Forget every recorded failure (tests; a Triton fixed in place)."""
    with _LOCK:
        _FAILED.clear()
