"""Backends whose kernel failed inside Triton in this process, by problem and arch.

A backend that passed every check (the probe's ``triton_kernels``, its own reasons) can
still fail when its kernel is compiled or launched for a problem: a Triton release that
cannot compile this variant, a shared-memory estimate that is off on this GPU, a missing
tool. Such a failure is remembered here (:func:`record`), the dispatcher rules that
backend out for that problem on that architecture for the rest of the process
(:func:`reason`, one of its reasons), decisions and plans made before are forgotten, and
the plan body that failed fails at once at every later call (no second compile):

* a call routed automatically is decided again at once and served by the next backend,
  with a warning naming the failure (``planning.attend``), unless a CUDA graph is being
  captured or ``out`` shares q's memory (a kernel that ran before the failing one may
  have written it): then it raises as below;
* a call that forced the backend (``backend=`` or ``PORTATTN_BACKEND``), and a plan the
  caller holds (outside ``torch.compile``, where ``Plan.run`` is a call of the one-call
  API), raise :class:`~portattn.errors.UnsupportedError` naming the backend, its variant
  and the failure, chained from Triton's exception (a new ``portattn.plan`` routes
  elsewhere).

Only failures to compile or launch count (:func:`raised_by_triton`): Triton's own
exception types, and runtime / OS errors raised in Triton's package except its CUDA
errors (``Triton Error [CUDA]``: a fault an earlier kernel left, an out-of-memory, a
capture error, none this kernel's doing). Errors of ours (a ``TypeError`` from Triton's
binder included), torch's CUDA out-of-memory and anything under the Triton interpreter (a
testing tool, where rerouting would hide a kernel bug from the tests) propagate unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from portattn.capabilities._text import one_line

_FAILED: dict[tuple, str] = {}
_LOCK = threading.Lock()


class KernelFailed(Exception):
    """Raised by a plan body whose kernel failed inside Triton; ``cause`` is Triton's
    exception (also ``__cause__``)."""

    def __init__(self, body, cause: BaseException):
        super().__init__(one_line(cause))
        self.body = body
        self.cause = cause


#: Exceptions raised in Triton's package that say a kernel could not be compiled or
#: launched (its compiler driving ptxas, a missing tool, a launcher's setup)
_FAILURE_TYPES = (RuntimeError, OSError, subprocess.CalledProcessError)
_CUDA_ERROR_PREFIX = "Triton Error [CUDA]"


def raised_by_triton(exc: BaseException) -> bool:
    """Whether ``exc`` says Triton could not compile or launch a kernel: a Triton
    exception type (``CompilationError``, ``OutOfResources``...), or a runtime / OS error
    raised in a frame of Triton's package that is not one of its CUDA errors. Never under
    the interpreter (see the module doc)."""
    from portattn.settings import TRITON_INTERPRET

    triton = sys.modules.get("triton")
    if triton is None or TRITON_INTERPRET.value():
        return False
    if type(exc).__module__.split(".")[0] == "triton":
        return True
    if not isinstance(exc, _FAILURE_TYPES) or str(exc).startswith(_CUDA_ERROR_PREFIX):
        return False
    package = os.path.dirname(os.path.abspath(getattr(triton, "__file__", "") or ""))
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not package:
        return False
    where = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return where.startswith(package + os.sep)


def record(backend: str, problem, arch: str, variant: str, cause: BaseException) -> str:
    """Remember that ``backend``'s kernel ``variant`` failed for ``problem`` on ``arch``;
    the first time, forget the decisions and plans made before. Returns the reason the
    dispatcher now gives for it."""
    from portattn.capabilities.cache import forget_decisions

    why = f"its kernel ({variant}) failed inside Triton in this process: {one_line(cause)}"
    key = (backend, problem, arch)
    with _LOCK:
        new = key not in _FAILED
        _FAILED[key] = why
    if new:
        forget_decisions()
    return why


def reason(backend: str, problem, arch: str) -> str | None:
    """Why ``backend`` is ruled out for ``problem`` on ``arch`` in this process, or None."""
    return _FAILED.get((backend, problem, arch)) if _FAILED else None


def clear() -> None:
    """Forget every recorded failure (tests; a Triton fixed in place)."""
    with _LOCK:
        _FAILED.clear()
