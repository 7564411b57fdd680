"""What every backend provides: support declared as data, reasons, a plan and a run.

A backend is a stateless object. The dispatcher asks ``why_not(problem, caps)`` (an empty
list means it can serve the call), then ``plan(problem, caps)`` once per :class:`Problem`
(cached), then ``run(...)`` on every call. ``run`` writes into ``out`` and must not
synchronize with the device when the metadata carries its max lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from portattn.capabilities import Capabilities
    from portattn.dispatch.problem import Problem
    from portattn.options import AttentionOptions
    from portattn.types import AttentionMetadata, PagedKVCache


@dataclass(frozen=True)
class Plan:
    """A backend's launch decision for one :class:`Problem`: a variant name (shown by
    ``explain``) and the parameters its ``run`` needs (tile sizes, segments, warps...)."""

    backend: str
    variant: str
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def describe(self) -> str:
        if not self.params:
            return self.variant
        inner = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.variant} ({inner})"


class Backend:
    """Base class. Subclasses set ``name`` and ``summary`` and override the three methods."""

    name: ClassVar[str] = "?"
    summary: ClassVar[str] = ""
    #: Why this backend is a slow path ("" = it is not one). The dispatcher logs a WARNING,
    #: once per problem class, when it has to take a slow path for tensors on a GPU.
    slow_path: ClassVar[str] = ""

    def why_not(self, problem: "Problem", caps: "Capabilities") -> list[str]:
        raise NotImplementedError

    def plan(self, problem: "Problem", caps: "Capabilities") -> Plan:
        return Plan(self.name, "default")

    def unavailable(self, caps: "Capabilities") -> list[str]:
        """Reasons this backend cannot run on this machine at all, whatever the call.

        The default asks ``why_not`` about a plain problem (fp16 decode, 32/8 heads of
        128, block 16) on the machine's device; backends may answer more directly."""
        from portattn.dispatch.problem import Problem

        plain = Problem.make(device_type=caps.device_type, dtype="float16")
        return list(self.why_not(plain, caps))

    def run(self, q: "torch.Tensor", cache: "PagedKVCache", metadata: "AttentionMetadata",
            options: "AttentionOptions", out: "torch.Tensor", plan: Plan) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<portattn backend {self.name}>"
