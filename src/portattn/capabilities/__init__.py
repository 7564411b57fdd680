"""What this machine can do, probed lazily, cached, and overridable.

    caps = portattn.capabilities.probe()          # this machine
    caps = portattn.capabilities.probe("sm90")    # a simulated H100 (see PROFILES)

Importing this package runs nothing: no torch, no Triton, no device query. Modules:

* ``model``     -- :class:`Capabilities` and :class:`Check` (frozen, hashable, JSON round trip)
* ``probe``     -- :func:`probe` and the real probing
* ``profiles``  -- simulated profiles (``PORTATTN_SIMULATE``)
* ``overrides`` -- ``PORTATTN_TD`` / ``PORTATTN_TRITON`` / ``PORTATTN_FLASH_ATTN``
* ``cache``     -- memory and disk caches, :func:`clear_cache`, :func:`last_probe_origin`
* ``report``    -- ``portattn report`` data and text (``python -m portattn.capabilities.report``)
* ``descriptor_check`` -- the Triton test kernels behind ``triton_kernels`` and
  ``tensor_descriptors``
"""

from __future__ import annotations

from typing import Any

from portattn.capabilities.cache import clear_cache, last_probe_origin
from portattn.capabilities.model import CHECK_FIELDS, Capabilities, Check
from portattn.capabilities.overrides import OVERRIDES
from portattn.capabilities.probe import probe
from portattn.capabilities.profiles import PROFILE_DESCRIPTIONS, PROFILES

__all__ = [
    "CHECK_FIELDS",
    "Capabilities",
    "Check",
    "OVERRIDES",
    "PROFILES",
    "PROFILE_DESCRIPTIONS",
    "clear_cache",
    "collect_report",
    "last_probe_origin",
    "probe",
    "render_report",
]

# The report module is also run as ``python -m portattn.capabilities.report``: importing
# it here eagerly would make runpy warn, so it is loaded on first use.
_LAZY = {"collect_report", "render_report"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from portattn.capabilities import report

        return getattr(report, name)
    raise AttributeError(f"module 'portattn.capabilities' has no attribute {name!r}")
