"""A cheap fingerprint of the environment variables that change portattn's decisions.

``os.environ.get`` costs ~0.6 us a name; the hot path of ``attention`` reads nine, so it
reads CPython's underlying mapping directly when there is one (same data, ~20x cheaper).
"""

from __future__ import annotations

import os

DECISION_VARIABLES = ("PORTATTN_BACKEND", "PORTATTN_SIMULATE", "PORTATTN_VALIDATE",
                      "PORTATTN_TD", "PORTATTN_TRITON", "PORTATTN_FLASH_ATTN",
                      "PORTATTN_FLASH_ATTN_INTERFACE", "PORTATTN_UNIFIED_SPLIT",
                      "TRITON_INTERPRET")
VALIDATE_INDEX = DECISION_VARIABLES.index("PORTATTN_VALIDATE")
#: raw PORTATTN_VALIDATE values (bytes on POSIX) -> forced on / off
VALIDATE_VALUES = {b"1": True, "1": True, b"0": False, "0": False}

_raw = getattr(os.environ, "_data", None)
_encode = getattr(os.environ, "encodekey", None)
if isinstance(_raw, dict) and _encode is not None:
    _KEYS = tuple(_encode(name) for name in DECISION_VARIABLES)

    def decision_environment() -> tuple:
        return tuple(map(_raw.get, _KEYS))
else:  # pragma: no cover - other Python implementations
    def decision_environment() -> tuple:
        return tuple(os.environ.get(name) for name in DECISION_VARIABLES)
