"""Quantize new K/V tokens for the cache, and dequantize what the cache holds.

These are the definitions every backend follows (value = stored * scale):

* ``fp8_per_tensor``: stored = clamp(x / scale, +-fp8_max) cast to fp8;
* ``int8_per_token_head``: scale = absmax(x over head_size) / 127 for each (token, kv head),
  stored = round(x / scale) clamped to [-127, 127];
* ``fp8_per_token_head``: scale = absmax / fp8_max, stored = (x / scale) cast to fp8.

A token-head whose values are all zero gets scale 1 (so it dequantizes to exact zeros),
and so does one whose absmax is so small that ``absmax / max`` is 0 in float32 (below
about 3.1e-43 for e4m3fn, 4e-41 for e5m2, 8.9e-44 for int8: its values read back as zeros,
never as the NaN of 0 / 0); one holding a NaN gets a NaN scale (so it dequantizes to NaN,
never to finite values).
"""

from __future__ import annotations

import torch

from portattn.types import KVQuant, Scale, fp8_max, scale_as_tensor

INT8_MAX = 127.0


def per_tensor_scale(quant: KVQuant, which: str) -> Scale:
    """The ``fp8_per_tensor`` scale of K (``which="k"``) or V (``"v"``)."""
    scale = quant.k_scale if which == "k" else quant.v_scale
    if scale is None:
        raise ValueError(f"{quant.mode} needs a {which}_scale")
    return scale


def quantize_for_cache(x: torch.Tensor, quant: KVQuant, which: str,
                       storage_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` ``[T, H, D]`` -> (stored ``[T, H, D]`` in ``storage_dtype``, scales ``[T, H]``
    float32 for per-token-head modes else None). ``which`` is ``"k"`` or ``"v"``."""
    if quant.mode == "none":
        return x.to(storage_dtype), None
    x32 = x.float()
    if quant.mode == "fp8_per_tensor":
        scale = scale_as_tensor(per_tensor_scale(quant, which), x.device)
        limit = fp8_max(storage_dtype)
        return (x32 / scale).clamp(-limit, limit).to(storage_dtype), None
    limit = INT8_MAX if quant.mode == "int8_per_token_head" else fp8_max(storage_dtype)
    absmax = x32.abs().amax(dim=-1)
    # quotients in fp64, rounded once to fp32, like the write kernel's div_rn (CUDA
    # PyTorch divides by a scalar through its reciprocal, an ulp off at times)
    # all zeros, or an absmax so small that absmax / limit is 0 in fp32: scale 1 (zeros
    # back, never 0 / 0); a NaN anywhere: a NaN scale (NaN back)
    scales = (absmax.double() / limit).float()
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    scaled = (x32.double() / scales.double().unsqueeze(-1)).float().clamp(-limit, limit)
    if quant.mode == "int8_per_token_head":
        scaled = scaled.round()
    return scaled.to(storage_dtype), scales


def dequantize(stored: torch.Tensor, quant: KVQuant, which: str,
               scales: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 values of cache entries ``stored`` ``[..., D]``; ``scales`` ``[...]`` are the
    matching per-token-head scales (per-token-head modes only)."""
    values = stored.float()
    if quant.mode == "none":
        return values
    if quant.mode == "fp8_per_tensor":
        scale = scale_as_tensor(per_tensor_scale(quant, which), stored.device)
        return values * scale
    if scales is None:
        raise ValueError(f"dequantize: {quant.mode} needs the per-token-head scales")
    return values * scales.unsqueeze(-1)
