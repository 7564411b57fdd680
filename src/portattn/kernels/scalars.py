"""Scales given as Python floats, as the one-element device tensors the kernels read.

Kernels read every scale from device memory (a tensor scale may change between CUDA-graph
replays without a recompile or a host sync); a float scale becomes a cached tensor, made
once per (role, value, device), so a steady-state call allocates nothing. The role (``k``,
``v``, ``q``, ``out``) keeps two scales of one call that happen to be equal floats in two
tensors: a replayed launch binds each kernel argument to one input, which it could not do
if the K and V scales were one tensor in this call and two in the next.
"""

from __future__ import annotations

import threading

import torch


class _DeviceScalars:
    """One-element fp32 device tensors for scales given as Python floats, made once per
    (role, value, device) and kept (floats are immutable, the memo is bounded)."""

    capacity = 256

    def __init__(self) -> None:
        self._entries: dict = {}
        self._lock = threading.Lock()

    def get(self, value, device: torch.device, role: str = "") -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.reshape(1) if value.dtype == torch.float32 else \
                value.reshape(1).to(torch.float32)
        key = (role, float(value), device)
        found = self._entries.get(key)
        if found is None:
            found = torch.full((1,), float(value), dtype=torch.float32, device=device)
            with self._lock:
                if len(self._entries) >= self.capacity:
                    self._entries.pop(next(iter(self._entries)))
                self._entries[key] = found
        return found


device_scalars = _DeviceScalars()


#: The kernels' code for a cache's quantization (their ``KV_QUANT`` / ``QUANT``).
KV_QUANT_CODES = {"none": 0, "fp8_per_tensor": 1, "int8_per_token_head": 2,
                  "fp8_per_token_head": 2}


def kv_scale_args(cache, device: torch.device, dummy: torch.Tensor) -> tuple:
    """``(code, k_scale, v_scale, k_strides, v_strides)`` as the attention and cache-write
    kernels take them: per-tensor scales as device scalars (strides unused), per-token-head
    scale caches with their (block, slot, head) strides, ``dummy`` where there is none."""
    quant = cache.quant
    code = KV_QUANT_CODES[quant.mode]
    if code == 1:
        return (code, device_scalars.get(quant.k_scale, device, "k"),
                device_scalars.get(quant.v_scale, device, "v"), (0, 0, 0), (0, 0, 0))
    if code == 2:
        k_scale, v_scale = cache.k_scale_cache, cache.v_scale_cache
        return code, k_scale, v_scale, k_scale.stride(), v_scale.stride()
    return code, dummy, dummy, (0, 0, 0), (0, 0, 0)
