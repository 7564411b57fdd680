"""Compiler options every launch of ours passes to Triton, whatever its release's default.

FP fusion (``enable_fp_fusion``): the compiler may contract a multiply and the add that
uses it into one FMA (one rounding instead of two). Triton has compiled with fusion on
by default; 3.9 warns at each compile of a launch that leaves the option unset
(``TRITON_DEFAULT_FP_FUSION is unset``) and says 3.10 will turn the default off. Our tile
configurations were timed, and our tolerances set, with fusion on, so a launch asks for
it rather than inheriting a release's default, which changes neither our numbers nor our
speed. Where the user has set ``TRITON_DEFAULT_FP_FUSION`` the choice is theirs: the
option is left out and Triton applies it. ``TRITON_FORCE_DISABLE_FP_FUSION=1`` (Triton
3.9 and newer) turns fusion off over any launch's option.

Importable without Triton (the probe's child process uses it too).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from portattn import settings

_FUSED: Mapping[str, Any] = MappingProxyType({"enable_fp_fusion": True})
_TRITONS_DEFAULT: Mapping[str, Any] = MappingProxyType({})


def compile_options() -> Mapping[str, Any]:
    """Keyword options for a ``kernel[grid](...)`` launch (read at each launch through
    Triton's JIT, not on the relaunch path: one lookup in the settings' snapshot)."""
    if settings.TRITON_DEFAULT_FP_FUSION.raw() is None:
        return _FUSED
    return _TRITONS_DEFAULT
