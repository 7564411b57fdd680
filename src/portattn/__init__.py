"""portattn: one stable paged-attention call that runs well on any GPU.

    out = portattn.attention(q, cache, metadata, causal=True)

    plan = portattn.plan(metadata, num_q_heads=32, dtype=torch.bfloat16, cache=cache)
    out = plan.run(q, cache)          # per layer: only per-layer work

Nothing is imported eagerly beyond this module: torch, Triton and the capability probe
load on first use (``__getattr__`` below), so ``import portattn`` is cheap and never
touches a device.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "attention": "portattn.api",
    "explain": "portattn.api",
    "plan": "portattn.planning",
    "AttentionPlan": "portattn.planning",
    "PagedKVCache": "portattn.types",
    "AttentionMetadata": "portattn.types",
    "KVQuant": "portattn.types",
    "UnsupportedError": "portattn.errors",
    "InputError": "portattn.errors",
    "PortattnError": "portattn.errors",
    "probe": "portattn.capabilities",
    "Capabilities": "portattn.capabilities",
    "Decision": "portattn.dispatch",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from portattn.api import attention, explain
    from portattn.capabilities.model import Capabilities
    from portattn.capabilities.probe import probe
    from portattn.dispatch import Decision
    from portattn.errors import InputError, PortattnError, UnsupportedError
    from portattn.planning import AttentionPlan, plan
    from portattn.types import AttentionMetadata, KVQuant, PagedKVCache


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'portattn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
