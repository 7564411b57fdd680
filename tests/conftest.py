"""Test-session setup shared by every test file.

* ``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is defined, so it
  is set here, at collection time, whenever no CUDA GPU is present (an explicit value in
  the environment wins).
* ``PORTATTN_TEST_SHARD=i/n`` runs one shard of the collected tests (parallel GPU runs).
* Markers: ``gpu`` tests are skipped without a CUDA/ROCm GPU; ``interpreter`` tests are
  skipped when Triton is missing, lacks what the kernels use (older than 3.5), or the
  interpreter is off (a GPU machine).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

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
    too_old = _kernels_cannot_run() if HAS_TRITON and interpreting else None
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords:
            if not HAS_TRITON:
                item.add_marker(skip_triton)
            elif not interpreting:
                item.add_marker(skip_interp)
            elif too_old:
                item.add_marker(pytest.mark.skip(reason=too_old))


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


def pytest_configure(config):
    """Keep the probe's disk cache out of the user's home: one temporary folder a session
    (an explicit PORTATTN_CACHE_DIR wins)."""
    if "PORTATTN_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["PORTATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="portattn-test-cache-")
