"""``benchmarks/dispatch_overhead.py`` runs on a CPU: its stand-in kernels (Triton's own
binder and cache key, a launcher that does nothing) must keep matching the fast-launch
hooks they replace, and every timed path of every case must end up relaunching a
recorded sequence (a path that fell back to Triton's JIT would time the wrong thing on
the GPU). Run in a child process: the script patches module globals."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_dispatch_overhead_runs_every_path_and_relaunches():
    from interpreter_gaps import numpy_gap_reason
    from jit_standin import require_native_binder

    require_native_binder()  # else nothing relaunches (the stand-in's binder is Triton's)
    if reason := numpy_gap_reason():  # the script runs its kernels interpreted
        pytest.skip(reason)
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dispatch_overhead.py"),
                             "--quick"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.splitlines()[0])
    assert set(report["cases"]) == {"decode", "decode_split", "decode_fp8", "prefill",
                                    "prefill_staged"}
    names = {"attention", "attention_out", "plan_run", "plan_run_out", "jit_path"}
    for case, data in report["cases"].items():
        assert data["replayed"] is True and data["fallback_reasons"] == [], (case, data)
        assert data["cheap_launch_us"] is not None, (case, data)
        assert set(data["layers"]) == {"1", "2"}, case
        ratio = data["layers"]["1"]["attention"] / data["triton_jit_us"]
        assert data["attention_per_jit_launch"] == pytest.approx(ratio, rel=2e-3, abs=2e-3)
        for timings in data["layers"].values():
            assert set(timings) == names and all(t > 0 for t in timings.values()), timings
