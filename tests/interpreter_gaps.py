"""Known ways this environment keeps Triton's interpreter from running our kernels, for
tests that start an interpreter process of their own (the conftest skips the
``interpreter``-marked tests for the same reasons)."""

from __future__ import annotations


def numpy_breaks_the_interpreter() -> bool:
    """Triton 3.6's interpreter fails runtime-bounded loops with numpy >= 2.4 (the GPU
    machine's torch image ships numpy 2.5). Only numpy's version is read: no Triton
    release has been seen to fix it, and every CI venv pins numpy < 2.4, so a later fix
    would show here as tests skipped on a newer numpy, not as a failure."""
    import numpy

    return tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4)


def numpy_gap_reason() -> str | None:
    """Why numpy keeps the interpreter from running our kernels here, or None (a test
    skips with it in its own body, so the skip names the test's line)."""
    if not numpy_breaks_the_interpreter():
        return None
    import numpy

    return (f"numpy {numpy.__version__} breaks Triton's interpreter on runtime-bounded "
            "loops (pyproject pins numpy<2.4)")
