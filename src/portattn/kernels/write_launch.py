"""Launcher of the cache write kernel (:mod:`portattn.kernels.cache_write`).

Reads no device value: slots are checked on the device (-1 and out-of-range slots are
skipped), scales given as floats become cached device tensors, so a write can be
captured in a CUDA graph together with the attention call that follows it.
"""

from __future__ import annotations

from portattn.kernels.cache_write import cache_write_kernel
from portattn.kernels.compile_options import compile_options
from portattn.kernels.heuristics import head_pad
from portattn.kernels.scalars import kv_scale_args
from portattn.quant import INT8_MAX
from portattn.types import fp8_max


def launch_cache_write(cache, key, value, slot_mapping) -> None:
    """Store ``key`` / ``value`` (``[T, H, D]``) at ``slot_mapping`` in ``cache``,
    quantizing as ``cache.quant`` says (arguments already checked by the cache)."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    code, k_scale, v_scale, k_strides, v_strides = kv_scale_args(cache, key.device, key)
    int8 = cache.quant.mode == "int8_per_token_head"
    qmax = 0.0 if code == 0 else INT8_MAX if int8 else fp8_max(cache.dtype)
    kc, vc = cache.key_cache, cache.value_cache
    cache_write_kernel[(num_tokens, cache.num_kv_heads)](
        key, value, slot_mapping, kc, vc, k_scale, v_scale, cache.num_blocks * cache.block_size,
        slot_mapping.stride(0), *key.stride(), *value.stride(), kc.stride(0), kc.stride(1),
        kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2), *k_strides, *v_strides,
        BLOCK_SIZE=cache.block_size, HEAD_QK=cache.head_size_qk,
        HEAD_QK_PAD=head_pad(cache.head_size_qk), HEAD_V=cache.head_size_v,
        HEAD_V_PAD=head_pad(cache.head_size_v), QUANT=code,
        INT8=int8, QMAX=qmax, num_warps=1, **compile_options())
