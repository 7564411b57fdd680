"""Scales given as Python floats, as the one-element device tensors the kernels read.

Kernels read every scale from device memory (a tensor scale may change between CUDA-graph
replays without a recompile or a host sync); a float scale becomes a cached tensor, made
once per (role, value, device, stream), so a steady-state call allocates nothing. The role
(``k``, ``v``, ``q``, ``out``) keeps two scales of one call that happen to be equal floats
in two tensors: a replayed launch binds each kernel argument to one input, which it could
not do if the K and V scales were one tensor in this call and two in the next.

The stream (:func:`portattn.devices.stream_key`, the current stream's handle) is in the
key because a tensor's fill is queued on the stream that made it, with no host sync: a
call on another stream that found it in the memo could run its kernels before that fill
and read garbage.
Each stream reads the tensors filled on it, in order, without an event or a sync on the
hot path; a value used from several streams costs one 4-byte tensor per stream. A CUDA
graph being captured (usually on a stream of its own, after a warm-up on another) binds
the tensor first made for the value on any stream of the device instead: that fill was
queued before the capture began, and the graph replays after it ended, where the usual
ways of capturing order the two (``torch.cuda.graph`` synchronizes the device before it
captures; a replay on a stream that waited for the warm-up stream follows its work).

A cached tensor is never dropped: a CUDA graph captured with it reads its address at
every replay, and freeing it would let the caching allocator hand that memory to another
tensor. So the memo is bounded by refusing new entries, not by evicting: past
:attr:`_DeviceScalars.capacity` values a new one gets a fresh tensor per call (captured,
it comes from the graph's own pool; eager, it is freed after the call's kernels). Nor is
one made while a graph is captured kept: its fill only runs when the graph replays, so an
eager call reading it before that would read garbage. Scales that change often should be
tensors.
"""

from __future__ import annotations

import threading

import torch

from portattn.devices import capturing_on, cuda_index, stream_key

_capturing = capturing_on  # a module name the tests can replace (the launchers make
# ``device``'s stream current)


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its CUDA index: a bare "cuda" is the current GPU, and as a key it
    would stand for every GPU (whose default streams all have the handle 0)."""
    if device.type == "cuda" and device.index is None:
        return torch.device(device.type, cuda_index(device))
    return device


def _key(value, device: torch.device, role: str) -> tuple:
    device = _indexed(device)
    return (role, float(value), device, stream_key(device))


class _DeviceScalars:
    """One-element fp32 device tensors for scales given as Python floats, made once per
    (role, value, device, stream) and kept for the process (see the module doc: never
    evicted, at most :attr:`capacity` of them)."""

    capacity = 4096  # a 512-byte block each: 2 MiB per device at most

    def __init__(self) -> None:
        # only ever changed in place, never rebound: ``find`` is this dict's lookup
        self._entries: dict = {}
        #: (role, value, device) -> the first tensor kept for it on any stream (captures)
        self._first: dict = {}
        self._lock = threading.Lock()
        #: ``find((role, value, device, stream_key(device)))``: the tensor the memo holds
        #: for that float value, else None (one dict lookup: no conversion, no tensor
        #: test; a caller passes floats only, :meth:`get` otherwise)
        self.find = self._entries.get
        #: the same tensors of CUDA devices keyed by (role, value, CUDA index, stream
        #: handle): ``find_on_queue`` is for a caller that already holds the current
        #: device's index and stream (a relaunch), and so skips asking for them. Other
        #: devices have no entry here: a caller without an index or a stream (None) finds
        #: nothing, never another device's tensor
        self._on_queue: dict = {}
        self.find_on_queue = self._on_queue.get

    def get(self, value, device: torch.device, role: str = "") -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.reshape(1) if value.dtype == torch.float32 else \
                value.reshape(1).to(torch.float32)
        device = _indexed(device)
        index = cuda_index(device)
        stream = stream_key(device)
        try:  # a float's key as it comes (ints and NumPy floats hash as their float)
            found = self._entries.get((role, value, device, stream))
        except TypeError:  # unhashable (a NumPy 0-d array): the float's key below
            found = None
        if found is None:
            key = (role, float(value), device, stream)
            found = self._entries.get(key)
        if found is None:
            capturing = _capturing(device)
            if capturing:  # any stream's tensor (module doc), else one of the graph's own
                found = self._first.get(key[:3])
                if found is not None:
                    return found
            found = torch.full((1,), float(value), dtype=torch.float32, device=device)
            if len(self._entries) < self.capacity and not capturing:
                with self._lock:
                    if len(self._entries) < self.capacity:
                        found = self._entries.setdefault(key, found)
                        self._first.setdefault(key[:3], found)
                        if index is not None:
                            self._on_queue.setdefault((role, key[1], index, stream), found)
        return found

    def kept(self, value, device: torch.device, role: str = "") -> bool:
        """Whether :meth:`get` answers ``value`` with the same tensor at every call (on the
        current stream): None and a tensor (a view of it) always, a float once the memo
        holds it for this stream (while a graph is captured: for any stream). A float it
        refused (the memo full, or met first while a CUDA graph was captured) is a new
        tensor at each call, which a recorded launch cannot bind."""
        if value is None or isinstance(value, torch.Tensor):
            return True
        key = _key(value, device, role)
        return key in self._entries or (key[:3] in self._first and _capturing(device))

    def __len__(self) -> int:
        return len(self._entries)


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
