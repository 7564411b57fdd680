"""The read-bound experiment (``benchmarks/paged_read_bound.py``) measures what it claims:
its read kernel folds exactly the bytes a decode reads (paged, both loops, 1-3
segments, against plain indexing) and its minimal decode matches the float64 oracle
with and without split-KV segments (the ticket merges and the second-kernel merge), in
Triton's interpreter, in a child process with its own environment."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from interpreter_gaps import numpy_gap_reason

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.interpreter
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_read_bound_and_minimal_decode_check_in_the_interpreter():
    if reason := numpy_gap_reason():
        pytest.skip(reason)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paged_read_bound.py"),
                             "--check"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sum("match" in line and "MISMATCH" not in line for line in lines) == 12, lines
    assert sum("minimal decode" in line for line in lines) == 12, lines
    assert sum("block decode" in line for line in lines) == 18, lines
    assert sum("V pairs" in line for line in lines) == 2, lines
