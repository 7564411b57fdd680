"""What every backend provides: support declared as data, reasons, a plan and a run.

A backend is a stateless object. The dispatcher asks ``why_not(problem, caps)`` (an empty
list means it can serve the call), then ``plan(problem, caps)`` once per :class:`Problem`
(cached), then ``run(...)`` on every call. ``run`` writes into ``out`` and must not
synchronize with the device when the metadata carries its max lengths.

``prepare(plan, problem, options, device)`` is the plan-time hook of
:func:`portattn.plan`: it returns a :class:`Runner` that holds whatever can be decided once
per plan (workspaces, recorded launches) and is called per layer. The default runner calls
``run``.
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
    ``explain``) and the parameters its ``run`` needs (tile sizes, segments, warps...).
    Parameters whose name starts with ``_`` are bookkeeping, left out of :meth:`describe`."""

    backend: str
    variant: str
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def describe(self) -> str:
        shown = {k: v for k, v in self.params.items() if not k.startswith("_")}
        if not shown:
            return self.variant
        inner = ", ".join(f"{k}={v}" for k, v in shown.items())
        return f"{self.variant} ({inner})"


class Backend:
    """Base class. Subclasses set ``name`` and ``summary`` and override the three methods."""

    name: ClassVar[str] = "?"
    summary: ClassVar[str] = ""
    #: Why this backend is a slow path ("" = it is not one). The dispatcher logs a WARNING,
    #: once per problem class, when it has to take a slow path for tensors on a GPU.
    slow_path: ClassVar[str] = ""
    #: Whether ``run`` takes host max lengths from the metadata (``max_lengths()``, a
    #: device read where the hints are None). A plan then passes it metadata carrying the
    #: plan's hints, read once when the plan was made, not on every layer.
    reads_max_lengths: ClassVar[bool] = False

    def why_not(self, problem: "Problem", caps: "Capabilities") -> list[str]:
        raise NotImplementedError

    def plan(self, problem: "Problem", caps: "Capabilities") -> Plan:
        return Plan(self.name, "default")

    def interface_for(self, problem: "Problem", caps: "Capabilities") -> str | None:
        """For a backend that wraps several library interfaces (``flash_attn``: fa2, fa3,
        fa4): the one its plan would use for ``problem``, None when none serves. The
        priority lists use it to place a backend by the measured speed of one interface."""
        return None

    def notes(self, problem: "Problem", plan: Plan,
              options: "AttentionOptions | None") -> list[str]:
        """Sentences ``explain`` adds about this call beyond the variant (e.g. that the
        first call will compile a kernel). ``options`` is None without a call's options."""
        return []

    def call_notes(self, plan: Plan, cache: "PagedKVCache") -> list[str]:
        """Sentences ``explain`` adds where the call's own tensors change what the plan
        runs (``plan`` is this backend's; e.g. a cache view that descriptor loads cannot
        read)."""
        return []

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

    def prepare(self, plan: Plan, problem: "Problem", options: "AttentionOptions",
                device: "torch.device") -> "Runner":
        """The per-layer callable of a plan (``options``: the plan's options, per-layer
        tensors None). Backends with plan-time work override it."""
        return Runner(self, plan, options)

    def __repr__(self) -> str:
        return f"<portattn backend {self.name}>"


class Runner:
    """What a plan calls per layer: ``runner(q, cache, metadata, out, layer, slot)``.

    ``layer`` is ``(alibi_slopes, sinks, q_scale, output_scale)``; ``slot`` is the object
    :meth:`slot` returned for this call's structure (shapes, strides, dtypes and scalar
    values of every argument), where a runner may keep per-structure state. This default
    runs the backend's ``run`` with the per-layer options filled in.
    """

    def __init__(self, backend: Backend, plan: Plan, options: "AttentionOptions"):
        self.backend = backend
        self.plan = plan
        self.options = options

    def slot(self, key) -> object:
        return None

    def options_for(self, layer: tuple) -> "AttentionOptions":
        if layer[0] is None and layer[1] is None and layer[2] is None and layer[3] is None:
            return self.options
        from dataclasses import replace

        alibi_slopes, sinks, q_scale, output_scale = layer
        return replace(self.options, alibi_slopes=alibi_slopes, sinks=sinks, q_scale=q_scale,
                       output_scale=output_scale)

    def __call__(self, q, cache, metadata, out, layer: tuple, slot) -> None:
        self.backend.run(q, cache, metadata, self.options_for(layer), out, self.plan)
