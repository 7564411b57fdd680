"""Test-session setup shared by every test file.

* ``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is defined, so it
  is set here, at collection time, whenever no CUDA GPU is present (an explicit value in
  the environment wins).
* ``PORTATTN_TEST_SHARD=i/n`` runs one shard of the collected tests (parallel GPU runs).
* The probe's disk cache goes to a temporary folder per test process (each pytest-xdist
  worker of the README's ``-n 2`` has its own), removed at the end.
* Markers: ``gpu`` tests are skipped without a CUDA/ROCm GPU; ``interpreter`` tests are
  skipped when Triton is missing, lacks what the kernels use (older than 3.5), the
  interpreter is off (a GPU machine), or numpy >= 2.4 breaks this Triton's interpreter
  (``interpreter_gaps.py`` runs a loop in a child process to tell).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from interpreter_gaps import numpy_gap_reason
from portattn import settings


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


HAS_GPU = _has_gpu()
HAS_TRITON = importlib.util.find_spec("triton") is not None

if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    _shard(config, items)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA/ROCm GPU")
    skip_triton = pytest.mark.skip(reason="needs Triton")
    skip_interp = pytest.mark.skip(reason="TRITON_INTERPRET=1 is not set (a GPU is present: "
                                   "set it to run the interpreter tier here)")
    interpreting = settings.TRITON_INTERPRET.value()
    cannot_run = (_kernels_cannot_run() or numpy_gap_reason()) if HAS_TRITON and interpreting \
        else None
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords:
            if not HAS_TRITON:
                item.add_marker(skip_triton)
            elif not interpreting:
                item.add_marker(skip_interp)
            elif cannot_run:
                item.add_marker(pytest.mark.skip(reason=cannot_run))


def _kernels_cannot_run() -> str | None:
    """Why this Triton cannot run portattn's kernels (features they use are missing: the
    probe then reports ``triton_kernels`` unusable, test_capabilities checks that), or
    None."""
    import triton

    from portattn.capabilities.probe import kernel_features_reason

    return kernel_features_reason(triton)


def _shard(config, items):
    """``PORTATTN_TEST_SHARD=i/n`` keeps every n-th test from the i-th: lets a GPU machine
    compile kernels for several test processes in parallel."""
    spec = settings.TEST_SHARD.value()
    if spec is None:
        return
    index, count = spec
    kept = [item for i, item in enumerate(items) if i % count == index]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


#: The folder name's start of a probe cache folder :func:`pytest_configure` made
_CACHE_PREFIX = "portattn-test-cache-"
_made_folders: list[str] = []


def pytest_configure(config):
    """Keep the probe's disk cache out of the user's home: one temporary folder a session,
    and one per pytest-xdist worker (a worker inherits the controller's environment, so
    it replaces the controller's folder with its own: one worker's probe writes stay out
    of another's tests). An explicit PORTATTN_CACHE_DIR wins, and every worker shares it."""
    import tempfile

    current = os.environ.get("PORTATTN_CACHE_DIR")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    made_by_controller = current is not None and \
        os.path.dirname(current) == tempfile.gettempdir() and \
        os.path.basename(current).startswith(_CACHE_PREFIX + "main-")
    if current is None or (worker and made_by_controller):
        folder = tempfile.mkdtemp(prefix=f"{_CACHE_PREFIX}{worker or 'main'}-")
        os.environ["PORTATTN_CACHE_DIR"] = folder
        _made_folders.append(folder)


def pytest_unconfigure(config):
    """Remove the probe cache folder :func:`pytest_configure` made for this process."""
    import shutil

    while _made_folders:
        shutil.rmtree(_made_folders.pop(), ignore_errors=True)
