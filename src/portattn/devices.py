"""Which GPU a call runs on, whatever the current device is.

Triton launches (and the recorded relaunches of :mod:`portattn.kernels.fast_launch`)
compile for, and enqueue on, the *current* CUDA device and its current stream. A serving
engine that drives several GPUs from one process may call portattn with tensors on
``cuda:1`` while ``cuda:0`` is current; :func:`on_device` makes the tensors' device
current for the launch, and only when it is not already (one cheap C call in the common
case, no guard object, nothing that synchronizes).

Importing this module imports torch (it is used on the call path only).
"""

from __future__ import annotations

import contextlib
import functools
from typing import ContextManager

import torch

_get_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
#: The raw handle of CUDA device ``index``'s current stream (what Triton launches on).
current_stream_handle = getattr(torch._C, "_cuda_getCurrentRawStream", None) or \
    (lambda index: torch.cuda.current_stream(index).cuda_stream)

#: Whether a CUDA graph is being captured on the current stream. Where torch is built with
#: CUDA or ROCm, torch's C function itself (``torch.cuda.is_current_stream_capturing`` is a
#: Python frame around it; a CPU build has a placeholder of that name instead).
stream_capturing = torch._C._cuda_isCurrentStreamCapturing \
    if hasattr(torch._C, "_CudaStreamBase") else torch.cuda.is_current_stream_capturing

_NO_GUARD = contextlib.nullcontext()


def capturing_on(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream, for tensors on
    ``device`` (never for another device type: a CPU build of torch cannot even ask)."""
    return device.type == "cuda" and bool(stream_capturing())


def stream_key(device: torch.device) -> int | None:
    """What tells ``device``'s queues apart: its current stream's handle on a CUDA (or
    ROCm) device, None elsewhere (one queue, in order)."""
    if device.type != "cuda":
        return None
    index = device.index
    return current_stream_handle(torch.cuda.current_device() if index is None else index)


def cuda_index(device: torch.device) -> int | None:
    """The CUDA index of ``device``; None for any other device type."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else int(_get_device())


def on_device(index: int | None) -> ContextManager:
    """A context that makes CUDA device ``index`` current for what runs inside, a no-op
    when ``index`` is None (not a CUDA device) or already current."""
    if index is None or _get_device() == index:
        return _NO_GUARD
    return torch.cuda.device(index)


def converts_fp8(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether Triton kernels on ``device`` convert to and from the fp8 ``dtype`` natively
    (the probe's rule, :func:`portattn.capabilities.profiles.fp8_formats`: NVIDIA sm89+,
    AMD gfx950 / gfx12 for e4m3fn and e5m2). The cache write kernel quantizes with that
    conversion; elsewhere (sm80, sm86, gfx942, the CPU) an fp8 cache is written by PyTorch."""
    index = cuda_index(device)
    return False if index is None else _converts_fp8(index, dtype)


@functools.cache
def _converts_fp8(index: int, dtype: torch.dtype) -> bool:
    """:func:`converts_fp8` for CUDA device ``index``, once per (device, dtype): a cache
    write asks on every decode step."""
    from portattn.capabilities.profiles import fp8_formats
    from portattn.types import FP8_FORMAT_NAMES

    props = torch.cuda.get_device_properties(index)
    if torch.version.hip:
        vendor, arch = "amd", str(getattr(props, "gcnArchName", "")).split(":")[0]
    else:
        vendor, arch = "nvidia", f"sm{props.major}{props.minor}"
    return FP8_FORMAT_NAMES[dtype] in fp8_formats(vendor, arch, (props.major, props.minor))
