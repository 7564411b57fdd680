"""Launcher of the cache write kernel (:mod:`portattn.kernels.cache_write`).

Reads no device value: slots are checked on the device (-1 and out-of-range slots are
skipped), scales given as floats become cached device tensors, so a write can be
captured in a CUDA graph together with the attention call that follows it.
"""

from __future__ import annotations

from portattn.kernels.cache_write import cache_write_kernel
from portattn.kernels.heuristics import head_pad
from portattn.kernels.scalars import device_scalars
from portattn.quant import INT8_MAX
from portattn.types import fp8_max


def launch_cache_write(cache, key, value, slot_mapping) -> None:
    """Store ``key`` / ``value`` (``[T, H, D]``) at ``slot_mapping`` in ``cache``,
    quantizing as ``cache.quant`` says (arguments already checked by the cache)."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    quant = cache.quant
    if quant.mode == "fp8_per_tensor":
        code, qmax = 1, fp8_max(cache.dtype)
        k_scale = device_scalars.get(quant.k_scale, key.device, "k")
        v_scale = device_scalars.get(quant.v_scale, key.device, "v")
        k_strides = v_strides = (0, 0, 0)
    elif quant.per_token_head:
        code = 2
        qmax = INT8_MAX if quant.mode == "int8_per_token_head" else fp8_max(cache.dtype)
        k_scale, v_scale = cache.k_scale_cache, cache.v_scale_cache
        k_strides, v_strides = k_scale.stride(), v_scale.stride()
    else:
        code, qmax = 0, 0.0
        k_scale = v_scale = key
        k_strides = v_strides = (0, 0, 0)
    kc, vc = cache.key_cache, cache.value_cache
    cache_write_kernel[(num_tokens, cache.num_kv_heads)](
        key, value, slot_mapping, kc, vc, k_scale, v_scale, cache.num_blocks * cache.block_size,
        *key.stride(), *value.stride(), kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), *k_strides, *v_strides,
        BLOCK_SIZE=cache.block_size, HEAD_QK=cache.head_size_qk,
        HEAD_QK_PAD=head_pad(cache.head_size_qk), HEAD_V=cache.head_size_v,
        HEAD_V_PAD=head_pad(cache.head_size_v), QUANT=code,
        INT8=quant.mode == "int8_per_token_head", QMAX=qmax, num_warps=1)
