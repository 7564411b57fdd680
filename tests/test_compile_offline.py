"""The unified kernel still compiles for sm90 (through ptxas), checked on a CPU machine.

Triton's NVIDIA backend compiles without a GPU, so CI catches a kernel change that no
longer compiles for Hopper before any device run: ``benchmarks/compile_offline.py`` in a
child process (the test session runs Triton's interpreter, whose kernels cannot be
compiled), for the plain, fp8 and descriptor variants. Also checks the property the
fp8 notes rely on: V_STAGE removes the single-byte shared loads.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["decode bf16", "decode fp8 per-tensor", "decode fp8 per-tensor V_STAGE",
            "decode bf16 descriptors"]


def _ptxas_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not "
                    "installed here")
def test_kernel_compiles_for_sm90_offline():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_offline.py"),
                          "--only", ",".join(VARIANTS)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {line[:34].strip(): line[34:].split() for line in run.stdout.splitlines()[1:]}
    assert set(VARIANTS) <= set(rows), run.stdout
    shared, pipelined, byte_loads, tma = (int(x) for x in rows["decode bf16"])
    assert pipelined > 0 and byte_loads == 0 and tma == 0
    assert int(rows["decode fp8 per-tensor V_STAGE"][2]) == 0  # no ld.shared.b8
    assert int(rows["decode bf16 descriptors"][3]) > 0  # TMA copies


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not "
                    "installed here")
def test_byte_decode_paths_compile_for_sm80_offline():
    """The fp8-from-bytes kernels that sm80 / sm86 run (never run on such a GPU here:
    the H200 runs them forced) and the plain ones compile for sm80 through ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    wanted = ["decode bf16", "decode e4m3 bytes", "prefill e5m2 bytes", "decode int8 codes"]
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_offline.py"),
                          "--arch", "80", "--only", ",".join(wanted)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "FAILED" not in run.stdout, run.stdout
    assert sum(1 for line in run.stdout.splitlines()[1:] if line.strip()) == len(wanted)
