"""What the ``portattn`` logger says about dispatch decisions.

* INFO, once per new problem class (a new decision-cache key): the backend that serves it,
  its variant, why the backends ranked above it did not, and the decision's notes (a
  measured lead that yielded).
* WARNING instead, once per slow backend, architecture and set of reasons: a slow path
  taken automatically for tensors on a GPU because nothing faster can serve the call (a
  backend whose ``slow_path`` says why it is slow, e.g. ``torch_ref``), with every reason
  of the backends ranked above it. Problem classes that differ only in what the reasons
  do not name (a decode loop's growing key count, the batch size) share their warning;
  each later one gets the INFO line. On the CPU the reference is the normal choice and
  gets INFO.
* A decision made again for a problem class already announced (after a kernel failure
  ruled its backend out) is announced again when it names another backend or variant.

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
    """The decision keys already logged, and the slow-path warnings already given
    (bounded; each set forgets everything when full)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._seen: set[Hashable] = set()
        self._warned: set[Hashable] = set()
        self._lock = threading.Lock()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._seen

    def first_time(self, key: Hashable) -> bool:
        return self._add(self._seen, key)

    def first_warning(self, key: Hashable) -> bool:
        return self._add(self._warned, key)

    def _add(self, seen: set, key: Hashable) -> bool:
        if key in seen:
            return False
        with self._lock:
            if key in seen:
                return False
            if len(seen) >= self.capacity:
                seen.clear()
            seen.add(key)
            return True

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
            self._warned.clear()


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
    """Log ``decision`` the first time ``key`` is seen (a slow path: the first time its
    backend, architecture and reasons are). ``slow_path``: the chosen backend's
    ``slow_path`` sentence ("" when it is not one). ``key`` names the decision's backend
    and variant as well as the problem class (:func:`announcement_key`)."""
    if not announced.first_time(key):
        return
    problem = decision.problem
    passed = _passed_over(decision)
    why = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in passed)
    slow = slow_path and decision.source == "auto" and problem.device_type != "cpu"
    if slow and announced.first_warning((decision.backend, decision.arch, why)):
        log.warning("slow path: %s (%s) serves %s on %s because nothing faster can: %s",
                    decision.backend, slow_path, problem.describe(), decision.arch,
                    why or "no other backend is registered")
        return
    if decision.source != "auto":
        how, why = f"forced by {decision.source}", ""
    else:  # a slow path already warned about for these reasons: this class at INFO
        how = "automatic; slow path, warned about above" if slow else "automatic"
    log.info("%s serves %s on %s (%s; variant %s)%s%s", decision.backend, problem.describe(),
             decision.arch, how, decision.plan.describe(),
             f"; passed over {why}" if why else "",
             "".join(f"; {note}" for note in decision.notes))


def announcement_key(decision_key: Hashable, decision: Decision) -> tuple:
    """What is announced once: a decision-cache key with the backend and variant decided
    for it (a re-decision after a kernel failure names another)."""
    return (decision_key, decision.backend, decision.variant)
