"""Per-layer options of :func:`portattn.attention`, normalized and checked once.

:func:`normalize_options` turns the keyword arguments into an :class:`AttentionOptions`
(defaults filled in, contradictions rejected). Everything here is host-side and cheap:
no device synchronization, no kernel launch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from portattn.errors import InputError
from portattn.types import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    INT32_MAX,
    PagedKVCache,
    Scale,
    _check_scalar_scale,
    _describe,
    check_strided,
    in_float32_range,
)


@dataclass(frozen=True, eq=False)
class AttentionOptions:
    """The options of one call after defaults are applied.

    ``out_dtype`` is the dtype of the result: ``out.dtype`` when ``out`` is given, fp8
    e4m3fn when ``output_scale`` is given, else ``q``'s dtype (bfloat16 for an fp8 ``q``).
    """

    scale: float
    causal: bool = True
    sliding_window: int | None = None
    softcap: float | None = None
    alibi_slopes: torch.Tensor | None = None
    alibi_sqrt: bool = False
    sinks: torch.Tensor | None = None
    q_scale: Scale | None = None
    output_scale: Scale | None = None
    out_dtype: torch.dtype = torch.float16

    @property
    def alibi(self) -> str:
        if self.alibi_slopes is None:
            return "none"
        return "sqrt" if self.alibi_sqrt else "linear"

    @property
    def fp8_output(self) -> bool:
        return self.out_dtype in FP8_DTYPES


def default_out_dtype(q_dtype: torch.dtype, output_scale: Scale | None) -> torch.dtype:
    """The result dtype when no ``out`` is given: fp8 e4m3fn with ``output_scale``, else
    ``q``'s dtype (bfloat16 for an fp8 ``q``)."""
    if output_scale is not None:
        return torch.float8_e4m3fn
    return torch.bfloat16 if q_dtype in FP8_DTYPES else q_dtype


def normalize_options(q: torch.Tensor, cache: PagedKVCache, *, scale: float | None = None,
                      causal: bool = True, sliding_window: int | None = None,
                      softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                      alibi_sqrt: bool = False, sinks: torch.Tensor | None = None,
                      q_scale: Scale | None = None, output_scale: Scale | None = None,
                      out: torch.Tensor | None = None) -> AttentionOptions:
    """Check every option against ``q`` and ``cache`` and fill in the defaults."""
    num_q_heads = q.shape[1]
    sliding_window = check_scalar_options(scale, causal, sliding_window, softcap, alibi_sqrt)
    if scale is None:
        scale = 1.0 / math.sqrt(cache.head_size_qk)
    _check_head_vector("alibi_slopes", alibi_slopes, num_q_heads, q.device)
    _check_head_vector("sinks", sinks, num_q_heads, q.device)
    if alibi_sqrt and alibi_slopes is None:
        raise InputError("alibi_sqrt", "False unless alibi_slopes is given",
                         "alibi_sqrt=True without alibi_slopes")
    if alibi_sqrt and not causal:
        raise InputError("alibi_sqrt", "causal=True (sqrt(p - k) is undefined for keys after "
                         "the query)", "alibi_sqrt=True with causal=False")

    q_is_fp8 = q.dtype in FP8_DTYPES
    if q_is_fp8 and q_scale is None:
        raise InputError("q_scale", "a scale for an fp8 q (q value = stored * q_scale)", "None")
    if not q_is_fp8 and q_scale is not None:
        raise InputError("q_scale", "None for a float16/bfloat16/float32 q",
                         f"a q_scale with q of dtype {q.dtype}")
    if q_scale is not None:
        _check_scalar_scale("q_scale", q_scale)
    if output_scale is not None:
        _check_scalar_scale("output_scale", output_scale)

    # a non-tensor out is named by check_out
    out_dtype = out.dtype if isinstance(out, torch.Tensor) else \
        default_out_dtype(q.dtype, output_scale)
    if out_dtype in FP8_DTYPES and output_scale is None:
        raise InputError("output_scale", "a scale when the output is fp8 "
                         "(out = clamp(result / output_scale))", "None")
    if out_dtype not in FP8_DTYPES and output_scale is not None:
        raise InputError("out", "an fp8 tensor (or None) when output_scale is given",
                         f"dtype {out_dtype}")
    if out_dtype not in FLOAT_DTYPES + FP8_DTYPES:
        raise InputError("out", "float16, bfloat16, float32 or fp8 dtype", str(out_dtype))
    for name, value in (("q_scale", q_scale), ("output_scale", output_scale)):
        if isinstance(value, torch.Tensor) and value.device != q.device:
            raise InputError(name, f"device {q.device} (q's)", str(value.device))
    return AttentionOptions(float(scale), causal, sliding_window,
                            None if softcap is None else float(softcap), alibi_slopes,
                            alibi_sqrt, sinks, q_scale, output_scale, out_dtype)


def check_scalar_options(scale, causal, sliding_window, softcap, alibi_sqrt) -> int | None:
    """The Python-scalar options (types and ranges; no tensor is read, so the traced path
    runs it too); returns the window as the kernels take it."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not in_float32_range(scale)):
        raise InputError("scale", "a finite positive float within float32's normal range "
                         "(default 1/sqrt(head_size_qk))", _describe(scale))
    if not isinstance(causal, bool):
        raise InputError("causal", "True or False", _describe(causal))
    if sliding_window is not None and (isinstance(sliding_window, bool) or
                                       not isinstance(sliding_window, int) or
                                       sliding_window < 1):
        raise InputError("sliding_window", "None or an int >= 1 (keys with p - k < window "
                         "are visible)", _describe(sliding_window))
    if sliding_window is not None and sliding_window > INT32_MAX:
        # positions are int32 (p - k <= 2**31 - 2): a wider window shows every key, as
        # this one does, and stays an int32 for the kernels
        sliding_window = INT32_MAX
    if softcap is not None and (isinstance(softcap, bool) or
                                not isinstance(softcap, (int, float)) or
                                not in_float32_range(softcap)):
        raise InputError("softcap", "None or a finite positive float within float32's "
                         "normal range", _describe(softcap))
    if not isinstance(alibi_sqrt, bool):
        raise InputError("alibi_sqrt", "True or False", _describe(alibi_sqrt))
    return sliding_window


def _check_head_vector(name: str, t: torch.Tensor | None, num_q_heads: int,
                       device: torch.device) -> None:
    if t is None:
        return
    check_strided(name, t)
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != num_q_heads:
        raise InputError(name, f"None or a 1-D tensor [num_q_heads={num_q_heads}]", _describe(t))
    if t.dtype not in FLOAT_DTYPES:
        raise InputError(name, "a float32 (or float16/bfloat16) tensor", str(t.dtype))
    if t.device != device:
        raise InputError(name, f"device {device} (q's)", str(t.device))
    if t.stride(0) != 1:
        raise InputError(name, "a contiguous tensor", f"stride {t.stride(0)}")
