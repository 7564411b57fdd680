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
