"""Per-architecture priority lists: a pure, cached function of the capabilities.

The dispatcher walks the list and takes the first backend with no reasons. Evidence for
the order lives in benchmarks/NOTES.md; the expected routing of every simulated profile
is checked in CI (ci/expected_routing.json).
"""

from __future__ import annotations

import functools

from portattn.capabilities import Capabilities

# Our Triton kernels first on GPUs; the reference last everywhere but on a CPU, where it
# is the default (the Triton interpreter is for testing kernels, far slower).
_GPU_ORDER = ("triton_unified", "torch_ref")
_CPU_ORDER = ("torch_ref", "triton_unified")


@functools.lru_cache(maxsize=64)
def priority_list(caps: Capabilities) -> tuple[str, ...]:
    if caps.device_type == "cpu":
        return _CPU_ORDER
    return _GPU_ORDER
