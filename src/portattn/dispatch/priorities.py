"""Per-architecture priority lists: a pure, cached function of the capabilities.

The dispatcher walks the list and takes the first backend with no reasons. Evidence for
the order lives in benchmarks/NOTES.md; the expected routing of every simulated profile
is checked in CI (ci/expected_routing.json).
"""

from __future__ import annotations

import functools

from portattn.capabilities import Capabilities

# NVIDIA: our Triton kernels first (they match cuDNN on decode, and on the H200 beat or
# equal flash-attn 2's paged paths on every PERFORMANCE.md shape at block 16 and 256,
# benchmarks/NOTES.md), flash-attn's paged kernels next for what they do not serve (FA3,
# where installed, is not measured yet), then the FA2 gather path (a copy of the K/V
# first), the reference last. AMD: flash-attn is CUDA-only. CPU: the reference is the
# default (the Triton interpreter is for testing kernels, far slower).
_NVIDIA_ORDER = ("triton_unified", "triton_diffkv", "flash_attn", "flash_attn_gather",
                 "torch_ref")
_AMD_ORDER = ("triton_unified", "triton_diffkv", "torch_ref")
_CPU_ORDER = ("torch_ref", "triton_unified", "triton_diffkv")


@functools.lru_cache(maxsize=64)
def priority_list(caps: Capabilities) -> tuple[str, ...]:
    if caps.device_type == "cpu":
        return _CPU_ORDER
    if caps.vendor == "nvidia":
        return _NVIDIA_ORDER
    return _AMD_ORDER
