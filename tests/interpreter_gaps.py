"""Known ways this environment keeps Triton's interpreter from running our kernels, for
tests that start an interpreter process of their own (the conftest skips the
``interpreter``-marked tests for the same reasons)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

#: A loop bounded by a loaded value, the construct numpy >= 2.4 breaks in Triton 3.6's
#: interpreter (it turns the bound into an int through a 1-element array); Triton 3.9's
#: handles it. Run in a child process: this one may have Triton compiling for a GPU.
_BOUNDED_LOOP = """
import torch, triton, triton.language as tl

@triton.jit
def bounded_loop(out_ptr, bound_ptr):
    acc = 0.0
    for i in range(0, tl.load(bound_ptr)):
        acc += 1.0
    tl.store(out_ptr, acc)

out = torch.zeros(1)
bounded_loop[(1,)](out, torch.tensor([3], dtype=torch.int32))
assert out.item() == 3.0, out
"""


def numpy_at_least_2_4() -> bool:
    import numpy

    return tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4)


@functools.cache
def numpy_gap_reason() -> str | None:
    """Why numpy keeps this Triton's interpreter from running a runtime-bounded loop, or
    None. Decided by running one (a child process, a few seconds, only with numpy >= 2.4):
    Triton 3.6's interpreter fails there, 3.9's does not. A test skips with it in its own
    body, so the skip names the test's line."""
    if not numpy_at_least_2_4():
        return None
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               HIP_VISIBLE_DEVICES="")
    child = subprocess.run([sys.executable, "-c", _BOUNDED_LOOP], env=env,
                           capture_output=True, text=True, timeout=300)
    # the error text the probe names numpy by (imported here, not at the conftest's import,
    # which runs before it sets TRITON_INTERPRET)
    from portattn.capabilities.probe import NUMPY_SCALAR_ERROR

    if child.returncode == 0 or NUMPY_SCALAR_ERROR not in child.stderr:
        return None  # it runs, or fails some other way: the tests then show how
    import numpy
    import triton

    return (f"numpy {numpy.__version__} breaks Triton {triton.__version__}'s interpreter on "
            "runtime-bounded loops (pyproject pins numpy<2.4)")
