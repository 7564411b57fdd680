"""Selection: walk the priority list, take the first backend with no reasons.

``decide`` is memoized per (problem, capabilities, forced backend) in a bounded,
thread-safe cache, so a steady-state call costs one dict lookup.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from portattn.backends.base import Backend, Plan
from portattn.capabilities import Capabilities
from portattn.dispatch import launch_failures
from portattn.dispatch.announce import announce, announced, announcement_key
from portattn.dispatch.clearable_lru import ClearableLRU
from portattn.dispatch.priorities import leads_for, priority_list, problem_class, yields_for
from portattn.dispatch.problem import Problem
from portattn.dispatch.registry import backend_names, load_backend, registered_name
from portattn.errors import UnknownBackendError, UnsupportedError
from portattn.settings import BACKEND, check_decision_settings, decision_environment


@dataclass(frozen=True)
class Decision:
    """Which backend serves a problem, with which variant, and why not the others.

    ``source``: ``"auto"`` (priority list), ``"argument"`` (``backend=``) or
    ``"environment"`` (``PORTATTN_BACKEND``). ``considered`` lists every registered backend
    in priority order as ``(name, reasons)``; an empty tuple means it could serve.
    ``notes``: the dispatcher's word on its order (a measured lead that yielded for this
    problem), then what else the chosen backend says about this call (``explain`` adds
    those, e.g. that the first call of a configuration compiles a kernel).
    """

    backend: str
    variant: str
    source: str
    problem: Problem
    arch: str
    plan: Plan
    considered: tuple[tuple[str, tuple[str, ...]], ...]
    notes: tuple[str, ...] = ()

    @property
    def rejected(self) -> dict[str, list[str]]:
        return {name: list(reasons) for name, reasons in self.considered if reasons}

    def __str__(self) -> str:
        lines = [f"problem: {self.problem.describe()}",
                 f"arch: {self.arch}",
                 f"backend: {self.backend} ({self.source})",
                 f"variant: {self.plan.describe()}"]
        lines.extend(f"note: {n}" for n in self.notes)
        for name, reasons in self.considered:
            if name == self.backend:
                continue
            if reasons:
                lines.append(f"rejected {name}:")
                lines.extend(f"  - {r}" for r in reasons)
            else:
                lines.append(f"not chosen {name}: {self.could_serve()}")
        return "\n".join(lines)

    def could_serve(self) -> str:
        """Why a backend that could serve this call was not chosen: ranked below the
        chosen one, or (a forced decision) not the one asked for."""
        if self.source != "auto":
            return f"could serve; {self.backend} was forced ({self.source})"
        return "could serve, lower priority"

    def to_dict(self) -> dict:
        return {"backend": self.backend, "variant": self.variant, "source": self.source,
                "arch": self.arch, "plan": {"variant": self.plan.variant,
                                            "params": dict(self.plan.params)},
                "problem": self.problem.to_dict(),
                "considered": [{"backend": n, "reasons": list(r)} for n, r in self.considered],
                "notes": list(self.notes)}


def forced_backend(argument: str | None) -> tuple[str | None, str]:
    """(name, source) from ``backend=`` or else ``PORTATTN_BACKEND``; ``backend="auto"``
    (any case) asks for automatic routing, whatever the variable says."""
    if isinstance(argument, str) and argument.strip().lower() == "auto":
        return None, "auto"
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
        reasons = list(backend.why_not(problem, caps))
    except Exception as exc:  # a backend bug must not take dispatch down
        reasons = [f"why_not raised {type(exc).__name__}: {exc}"]
    failed = launch_failures.reason(name, problem, caps.arch)
    if failed is not None:
        reasons.append(failed)
    return backend, reasons


def _priorities(problem: Problem, caps: Capabilities) -> tuple[tuple[str, ...], list[str]]:
    """This problem's priority list: the arch's order with the measured leads of its class
    that apply (a lead applies when its backend would use the measured interface and no
    measured yield covers the problem), and a note per lead that yielded."""
    klass = problem_class(problem)
    serving = set()
    notes = []
    for lead in leads_for(caps.arch, klass):
        backend = load_backend(lead.backend)
        if isinstance(backend, str):
            continue
        try:
            if backend.interface_for(problem, caps) != lead.interface:
                continue
        except Exception:  # a backend bug must not take dispatch down
            continue
        yielded = _yield_applying(lead.backend, problem, caps, klass)
        if yielded is not None:
            notes.append(yielded.describe())
            continue
        serving.add((lead.backend, lead.interface))
    return priority_list(caps, klass, frozenset(serving)), notes


def _yield_applying(backend: str, problem: Problem, caps: Capabilities, klass: str):
    """The measured yield of ``backend``'s lead that covers ``problem`` and whose kernel
    the backend it yields to would run (its plan sets the row's ``plan_param``), or None."""
    for row in yields_for(caps.arch, klass, backend, problem):
        kept, reasons = backend_reasons(row.ahead_of, problem, caps)
        if kept is None or reasons:
            continue
        try:
            if kept.plan(problem, caps).params.get(row.plan_param):
                return row
        except Exception:  # a backend bug must not take dispatch down: the lead stays
            continue
    return None


def _order(preferred: tuple[str, ...]) -> list[str]:
    """Registered backends: the priority list first, then the rest."""
    registered = backend_names()
    first = [n for n in preferred if n in registered]
    return first + [n for n in registered if n not in first]


def _decide(problem: Problem, caps: Capabilities, forced: str | None, source: str) -> Decision:
    preferred, notes = _priorities(problem, caps)
    order = _order(preferred)
    via = BACKEND.name if source == "environment" else source
    if forced is not None and forced not in order:
        matched = registered_name(forced)
        if matched is None:
            raise UnknownBackendError(BACKEND.name if source == "environment" else "backend",
                                      forced, order)
        forced = matched
    considered = []
    chosen: Backend | None = None
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
                    tuple(considered), tuple(notes) if source == "auto" else ())


#: (problem, caps, forced backend, source, decision environment) -> Decision
decision_cache = ClearableLRU(1024)


def decide(problem: Problem, caps: Capabilities, backend: str | None = None, *,
           log: bool = True) -> Decision:
    """The cached decision for ``problem`` (``backend`` forces one by name).

    ``log``: tell the ``portattn`` logger about a problem class it has not seen yet
    (:mod:`.announce`); listings of hypothetical problems (the report's routing table)
    pass False."""
    forced, source = forced_backend(backend)
    key = (problem, caps, forced, source, decision_environment())
    generation = decision_cache.generation  # before the lookup: a clear after it counts
    decision = decision_cache.get(key)
    if decision is None:
        if forced is None:  # a bad value names its variable, whichever backend reads it
            check_decision_settings()  # (a forced backend's own reads become its reasons)
        decision = decision_cache.put(key, _decide(problem, caps, forced, source),
                                      generation)
    if log:
        said = announcement_key(key, decision)
        if said not in announced:
            announce(decision, said, getattr(load_backend(decision.backend), "slow_path", ""))
    return decision


def with_notes(decision: Decision, options=None, cache=None) -> Decision:
    """``decision`` with the chosen backend's notes about the call (``options``: the call's
    normalized options, None when there is no call, as in ``portattn explain``; ``cache``:
    the call's cache, whose tensors may change what the plan runs)."""
    backend = load_backend(decision.backend)
    if isinstance(backend, str):
        return decision
    notes = tuple(backend.notes(decision.problem, decision.plan, options))
    if cache is not None:
        notes += tuple(backend.call_notes(decision.plan, cache))
    return dataclasses.replace(decision, notes=decision.notes + notes) if notes else decision
