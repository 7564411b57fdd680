"""Selection: walk the priority list, take the first backend with no reasons.

``decide`` is memoized per (problem, capabilities, forced backend) in a bounded,
thread-safe cache, so a steady-state call costs one dict lookup.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from portattn.backends.base import Backend, Plan
from portattn.capabilities import Capabilities
from portattn.dispatch.announce import announce, announced
from portattn.dispatch.priorities import priority_list
from portattn.dispatch.problem import Problem
from portattn.dispatch.registry import backend_names, load_backend
from portattn.errors import UnsupportedError
from portattn.settings import BACKEND, decision_environment


@dataclass(frozen=True)
class Decision:
    """Which backend serves a problem, with which variant, and why not the others.

    ``source``: ``"auto"`` (priority list), ``"argument"`` (``backend=``) or
    ``"environment"`` (``PORTATTN_BACKEND``). ``considered`` lists every registered backend
    in priority order as ``(name, reasons)``; an empty tuple means it could serve.
    """

    backend: str
    variant: str
    source: str
    problem: Problem
    arch: str
    plan: Plan
    considered: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def rejected(self) -> dict[str, list[str]]:
        return {name: list(reasons) for name, reasons in self.considered if reasons}

    def __str__(self) -> str:
        lines = [f"problem: {self.problem.describe()}",
                 f"arch: {self.arch}",
                 f"backend: {self.backend} ({self.source})",
                 f"variant: {self.plan.describe()}"]
        for name, reasons in self.considered:
            if name == self.backend:
                continue
            if reasons:
                lines.append(f"rejected {name}:")
                lines.extend(f"  - {r}" for r in reasons)
            else:
                lines.append(f"not chosen {name}: could serve, lower priority")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "variant": self.variant, "source": self.source,
                "arch": self.arch, "plan": {"variant": self.plan.variant,
                                            "params": dict(self.plan.params)},
                "problem": self.problem.to_dict(),
                "considered": [{"backend": n, "reasons": list(r)} for n, r in self.considered]}


def forced_backend(argument: str | None) -> tuple[str | None, str]:
    """(name, source) from ``backend=`` or else ``PORTATTN_BACKEND``."""
    if argument is not None:
        return argument, "argument"
    name: str | None = BACKEND.value()
    if name is not None:
        return name, "environment"
    return None, "auto"


def backend_reasons(name: str, problem: Problem, caps: Capabilities) -> tuple[Backend | None,
                                                                              list[str]]:
    backend = load_backend(name)
    if isinstance(backend, str):
        return None, [backend]
    try:
        return backend, list(backend.why_not(problem, caps))
    except Exception as exc:  # a backend bug must not take dispatch down
        return backend, [f"why_not raised {type(exc).__name__}: {exc}"]


def _order(caps: Capabilities) -> list[str]:
    """Registered backends: this arch's priority list first, then the rest."""
    registered = backend_names()
    preferred = [n for n in priority_list(caps) if n in registered]
    return preferred + [n for n in registered if n not in preferred]


def _decide(problem: Problem, caps: Capabilities, forced: str | None, source: str) -> Decision:
    order = _order(caps)
    via = BACKEND.name if source == "environment" else source
    if forced is not None and forced not in order:
        raise UnsupportedError(f"unknown backend {forced!r} requested through {via} "
                               f"(known: {', '.join(order)})")
    considered = []
    chosen: Backend | None = None
    preferred = priority_list(caps)
    for name in order:
        backend, reasons = backend_reasons(name, problem, caps)
        considered.append((name, tuple(reasons)))
        wanted = name == forced if forced is not None else name in preferred
        if chosen is None and wanted and not reasons:
            chosen = backend
    if chosen is None:
        if forced is not None:
            raise UnsupportedError(f"backend {forced!r} (requested through {via}) cannot "
                                   f"serve this call: {problem.describe()}",
                                   {n: list(r) for n, r in considered if n == forced})
        raise UnsupportedError(f"no backend can serve this call on {caps.arch}: "
                               f"{problem.describe()}",
                               {n: list(r) for n, r in considered})
    plan = chosen.plan(problem, caps)
    return Decision(chosen.name, plan.variant, source, problem, caps.arch, plan,
                    tuple(considered))


class DecisionCache:
    """A bounded LRU map (problem, caps, forced backend, source, decision environment) ->
    Decision, safe across threads."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        with self._lock:
            decision = self._entries.get(key)
            if decision is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return decision

    def put(self, key, decision: Decision) -> None:
        with self._lock:
            self.misses += 1
            self._entries[key] = decision
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


decision_cache = DecisionCache()


def decide(problem: Problem, caps: Capabilities, backend: str | None = None, *,
           log: bool = True) -> Decision:
    """The cached decision for ``problem`` (``backend`` forces one by name).

    ``log``: tell the ``portattn`` logger about a problem class it has not seen yet
    (:mod:`.announce`); listings of hypothetical problems (the report's routing table)
    pass False."""
    forced, source = forced_backend(backend)
    key = (problem, caps, forced, source, decision_environment())
    decision = decision_cache.get(key)
    if decision is None:
        decision = _decide(problem, caps, forced, source)
        decision_cache.put(key, decision)
    if log and key not in announced:
        chosen = load_backend(decision.backend)
        announce(decision, key, getattr(chosen, "slow_path", ""))
    return decision
