"""Environment overrides of automatic capability answers (three states each).

Every automatic yes/no answer the dispatcher acts on can be overruled by the user:

========================  =======================  ======================================
variable                  Capabilities field       what it switches
========================  =======================  ======================================
``PORTATTN_TD``           ``tensor_descriptors``   descriptor loads in our Triton kernels
``PORTATTN_TRITON``       ``triton_kernels``       our Triton kernels at all
``PORTATTN_FLASH_ATTN``   ``flash_attn``           the flash-attn backend
========================  =======================  ======================================

Values: unset (or empty) = automatic (the probe or profile decides), ``1`` = forced on
(the user insists; ``ok=True`` even where the probe said no), ``0`` = forced off. Anything
else raises ``ValueError`` naming the variable. Overrides are applied on top of probed and
simulated capabilities alike, each time :func:`probe` is called, and are never written to
the disk cache. To add one, append a row to :data:`OVERRIDES`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Mapping

from portattn.capabilities.model import CHECK_FIELDS, Capabilities, Check

ACCEPTED_VALUES = "unset, 0, 1"


@dataclass(frozen=True)
class Override:
    name: str
    env_var: str
    field: str
    description: str


OVERRIDES: tuple[Override, ...] = (
    Override("tensor_descriptors", "PORTATTN_TD", "tensor_descriptors",
             "tensor-descriptor loads in portattn's Triton kernels"),
    Override("triton", "PORTATTN_TRITON", "triton_kernels", "portattn's Triton kernels"),
    Override("flash_attn", "PORTATTN_FLASH_ATTN", "flash_attn", "the flash-attn backend"),
)

assert all(o.field in CHECK_FIELDS for o in OVERRIDES)

OVERRIDE_ENV_VARS: tuple[str, ...] = tuple(o.env_var for o in OVERRIDES)


def parse_state(env_var: str, raw: str | None) -> bool | None:
    """``None`` (auto) for unset/empty, True for ``"1"``, False for ``"0"``."""
    value = "" if raw is None else raw.strip()
    if value == "":
        return None
    if value == "1":
        return True
    if value == "0":
        return False
    raise ValueError(f"{env_var}={raw!r} is not valid; accepted values: {ACCEPTED_VALUES} "
                     f"(unset = automatic, 1 = force on, 0 = force off)")


def read_overrides(environ: Mapping[str, str] | None = None) -> tuple[bool | None, ...]:
    """The state of every row of :data:`OVERRIDES`, in order; ``ValueError`` if invalid."""
    env = os.environ if environ is None else environ
    return tuple(parse_state(o.env_var, env.get(o.env_var)) for o in OVERRIDES)


def active_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{env_var: "0" | "1"}`` for the overrides that are set (for reports)."""
    states = read_overrides(environ)
    return {o.env_var: "1" if s else "0" for o, s in zip(OVERRIDES, states) if s is not None}


def apply_overrides(caps: Capabilities, states: tuple[bool | None, ...]) -> Capabilities:
    """``caps`` with the forced checks replaced (``source="overridden"``)."""
    changes: dict[str, Check] = {}
    for override, state in zip(OVERRIDES, states):
        if state is None:
            continue
        how = "on" if state else "off"
        changes[override.field] = Check(state, f"forced {how} by {override.env_var}="
                                               f"{int(state)}", "overridden")
    return dataclasses.replace(caps, **changes) if changes else caps
