"""The cache write kernel behind :meth:`portattn.PagedKVCache.write` on a GPU.

Layout
------
* ``key`` ``[num_tokens, num_kv_heads, HEAD_QK]`` and ``value`` ``[..., HEAD_V]`` (float16,
  bfloat16 or float32, any strides) are the new tokens; ``slot_mapping`` ``[num_tokens]``
  (int32/int64, any stride) says where each goes: slot ``s`` is block ``s // BLOCK_SIZE``, offset
  ``s % BLOCK_SIZE``;
* the caches ``[num_blocks, BLOCK_SIZE, num_kv_heads, HEAD]`` through (block, slot, head)
  strides with a contiguous last dim (split, packed and DiffKV views alike);
* per-token-head scale caches ``[num_blocks, BLOCK_SIZE, num_kv_heads]`` fp32 through their
  strides; per-tensor scales are one-element fp32 tensors.

Grid ``(num_tokens, num_kv_heads)``: one program stores one token-head of K and of V.
Slots of -1 (padding) and slots outside the cache are skipped on the device, so nothing
here reads a device value on the host: no sync, capturable in a CUDA graph.

``QUANT`` (constexpr): 0 store as the cache's dtype; 1 per-tensor fp8: ``clamp(x / scale,
+-QMAX)``; 2 per-token-head: ``scale = absmax / QMAX`` (1 where that is 0: an all-zero
token-head, or an absmax that underflows; NaN for one holding a NaN), ``stored = x /
scale`` (rounded half to even and stored as int8 when ``INT8``), the scale written to the
scale cache. A NaN input stays NaN: fp8 stores NaN, and an int8 token-head's NaN scale
makes it read back as NaN. Divisions round to nearest (``div_rn``), as torch's do, so the
kernel stores what :mod:`portattn.quant` defines.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(y):
    """``torch.round`` for fp32 ``y`` (exact: ``y - floor(y)`` has no rounding error)."""
    low = tl.floor(y)
    frac = y - low
    low_is_odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & low_is_odd)
    return tl.where(up, low + 1.0, low)


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _store_token_head(src_ptr, stride_d, dst_ptr, scale_ptr, scale_dst_ptr,
                      HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, QUANT: tl.constexpr,
                      INT8: tl.constexpr, QMAX: tl.constexpr):
    offs = tl.arange(0, HEAD_PAD)
    ok = offs < HEAD
    x = tl.load(src_ptr + offs * stride_d, mask=ok, other=0.0)
    if QUANT == 0:
        tl.store(dst_ptr + offs, x.to(dst_ptr.dtype.element_ty), mask=ok)
    else:
        x = x.to(tl.float32)
        if QUANT == 1:
            y = tl.math.div_rn(x, tl.load(scale_ptr))
        else:
            absmax = tl.reduce(tl.abs(x), 0, _max_keeping_nan)  # tl.max would skip NaN
            scale = tl.math.div_rn(absmax, QMAX)
            scale = tl.where(scale == 0.0, 1.0, scale)  # zeros, or an absmax that underflows
            y = tl.math.div_rn(x, scale)
            tl.store(scale_dst_ptr, scale)
        # NaN stays NaN (a plain min / max on a GPU would clamp it to +-QMAX)
        y = tl.minimum(tl.maximum(y, -QMAX, propagate_nan=tl.PropagateNan.ALL), QMAX,
                       propagate_nan=tl.PropagateNan.ALL)
        if INT8:
            y = _round_half_even(y)
        tl.store(dst_ptr + offs, y.to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def cache_write_kernel(key_ptr, value_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
                       k_scale_ptr, v_scale_ptr, num_slots, stride_slot,
                       stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                       stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                       stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
                       BLOCK_SIZE: tl.constexpr, HEAD_QK: tl.constexpr,
                       HEAD_QK_PAD: tl.constexpr, HEAD_V: tl.constexpr,
                       HEAD_V_PAD: tl.constexpr, QUANT: tl.constexpr, INT8: tl.constexpr,
                       QMAX: tl.constexpr):
    """Store token ``program_id(0)``'s K and V of kv head ``program_id(1)`` (module doc)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t * stride_slot).to(tl.int64)
    if (slot < 0) | (slot >= num_slots):
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + h * stride_kch
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + h * stride_vch
    if QUANT == 2:
        k_scale_dst = k_scale_ptr + block * stride_ksb + offset * stride_kss + h * stride_ksh
        v_scale_dst = v_scale_ptr + block * stride_vsb + offset * stride_vss + h * stride_vsh
    else:
        k_scale_dst = k_scale_ptr
        v_scale_dst = v_scale_ptr
    _store_token_head(key_ptr + t * stride_kt + h * stride_kh, stride_kd, k_dst, k_scale_ptr,
                      k_scale_dst, HEAD_QK, HEAD_QK_PAD, QUANT, INT8, QMAX)
    _store_token_head(value_ptr + t * stride_vt + h * stride_vh, stride_vd, v_dst,
                      v_scale_ptr, v_scale_dst, HEAD_V, HEAD_V_PAD, QUANT, INT8, QMAX)
