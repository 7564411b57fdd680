"""What the ``portattn`` logger says about dispatch decisions.

* INFO, once per new problem class (a new decision-cache key): the backend that serves it,
  its variant, why the backends ranked above it did not, and the decision's notes (a
  measured lead that yielded).
* WARNING, once per problem class instead: a slow path taken automatically for tensors
  on a GPU because nothing faster can serve the call (a backend whose ``slow_path`` says
  why it is slow, e.g. ``torch_ref``), with every reason of the backends ranked above it.
  On the CPU the reference is the normal choice and gets INFO.

The logger has no handler of its own: configure :mod:`logging` to see the INFO lines;
without any configuration Python's last-resort handler prints the WARNINGs to stderr.
Announcing costs one set lookup per decision; the memory of what was announced is bounded.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Hashable

if TYPE_CHECKING:  # pragma: no cover
    from portattn.dispatch.selector import Decision

log = logging.getLogger("portattn")


class Announcements:
    """The decision keys already logged (bounded; forgets everything when full)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._seen: set[Hashable] = set()
        self._lock = threading.Lock()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._seen

    def first_time(self, key: Hashable) -> bool:
        if key in self._seen:
            return False
        with self._lock:
            if key in self._seen:
                return False
            if len(self._seen) >= self.capacity:
                self._seen.clear()
            self._seen.add(key)
            return True

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


announced = Announcements()


def _passed_over(decision: Decision) -> list[tuple[str, tuple[str, ...]]]:
    """The backends considered before the chosen one (priority order) and their reasons."""
    before = []
    for name, reasons in decision.considered:
        if name == decision.backend:
            break
        if reasons:
            before.append((name, reasons))
    return before


def announce(decision: Decision, key: Hashable, slow_path: str) -> None:
    """Log ``decision`` the first time ``key`` is seen. ``slow_path``: the chosen
    backend's ``slow_path`` sentence ("" when it is not one)."""
    if not announced.first_time(key):
        return
    problem = decision.problem
    passed = _passed_over(decision)
    why = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in passed)
    if slow_path and decision.source == "auto" and problem.device_type != "cpu":
        log.warning("slow path: %s (%s) serves %s on %s because nothing faster can: %s",
                    decision.backend, slow_path, problem.describe(), decision.arch,
                    why or "no other backend is registered")
        return
    if decision.source != "auto":
        how, why = f"forced by {decision.source}", ""
    else:
        how = "automatic"
    log.info("%s serves %s on %s (%s; variant %s)%s%s", decision.backend, problem.describe(),
             decision.arch, how, decision.plan.describe(),
             f"; passed over {why}" if why else "",
             "".join(f"; {note}" for note in decision.notes))
