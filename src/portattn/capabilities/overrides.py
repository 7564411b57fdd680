"""Environment overrides of automatic capability answers (three states each).

Every automatic yes/no answer the dispatcher acts on can be overruled by the user:

========================  =======================  ======================================
variable                  Capabilities field       what it switches
========================  =======================  ======================================
``PORTATTN_TD``           ``tensor_descriptors``   descriptor loads in our Triton kernels
``PORTATTN_TRITON``       ``triton_kernels``       our Triton kernels at all
``PORTATTN_FLASH_ATTN``   ``flash_attn``           the flash-attn backend
========================  =======================  ======================================

Values: unset, empty or ``auto`` = automatic (the probe or profile decides), ``1`` =
forced on (the user insists; ``ok=True`` even where the probe said no), ``0`` = forced off.
Anything else raises :class:`~portattn.errors.InputError` (a ``ValueError``) naming the
variable. The variables themselves are defined in :mod:`portattn.settings`. Overrides are
applied on top of probed and simulated capabilities alike, each time :func:`probe` is
called, and are never written to the disk cache. To add one, define its setting and append
a row to :data:`OVERRIDES`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from portattn import settings
from portattn.capabilities.model import Capabilities, Check


@dataclass(frozen=True)
class Override:
    name: str
    setting: settings.Setting
    field: str  # one of CHECK_FIELDS
    description: str

    @property
    def env_var(self) -> str:
        return self.setting.name


OVERRIDES: tuple[Override, ...] = (
    Override("tensor_descriptors", settings.TENSOR_DESCRIPTORS, "tensor_descriptors",
             "tensor-descriptor loads in portattn's Triton kernels"),
    Override("triton", settings.TRITON, "triton_kernels", "portattn's Triton kernels"),
    Override("flash_attn", settings.FLASH_ATTN, "flash_attn", "the flash-attn backend"),
)

OVERRIDE_ENV_VARS: tuple[str, ...] = tuple(o.env_var for o in OVERRIDES)


def raw_overrides() -> tuple[str | None, ...]:
    """The overrides' raw texts (a cheap cache key)."""
    return tuple(o.setting.raw() for o in OVERRIDES)


def read_overrides(environ: Mapping[str, str] | None = None) -> tuple[bool | None, ...]:
    """The state of every row of :data:`OVERRIDES`, in order (None = automatic);
    ``InputError`` if a value is invalid. ``environ``: read these texts instead."""
    if environ is None:
        return tuple(o.setting.value() for o in OVERRIDES)
    return tuple(o.setting.parse_text(environ.get(o.env_var)) for o in OVERRIDES)


def active_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{env_var: "0" | "1"}`` for the overrides that are set (for reports)."""
    states = read_overrides(environ)
    return {o.env_var: "1" if s else "0" for o, s in zip(OVERRIDES, states) if s is not None}


def apply_overrides(caps: Capabilities, states: tuple[bool | None, ...]) -> Capabilities:
    """``caps`` with the forced checks replaced (``source="overridden"``)."""
    changes: dict[str, Any] = {}
    for override, state in zip(OVERRIDES, states):
        if state is None:
            continue
        how = "on" if state else "off"
        changes[override.field] = Check(state, f"forced {how} by {override.env_var}="
                                               f"{int(state)}", "overridden")
    return dataclasses.replace(caps, **changes) if changes else caps
