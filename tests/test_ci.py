"""The CI configuration agrees with its one source of truth, ci/matrix.json."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
MATRIX = json.loads((ROOT / "ci" / "matrix.json").read_text())
WORKFLOWS = ROOT / ".github" / "workflows"


def test_triton_versions_are_the_pinned_one_then_the_newest():
    versions = MATRIX["triton_versions"]
    pinned = re.search(r"^triton==(\S+)$", (ROOT / "ci" / "constraints.txt").read_text(),
                       re.MULTILINE)
    assert pinned and versions[0] == pinned.group(1)
    assert len(versions) >= 2, "the CPU job runs the newest Triton too"
    assert max(versions, key=Version) == versions[-1]


def _readme_test_command() -> str:
    """The test command of the README's second line, after its setup step."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("bash scripts/setup.sh && ")]
    assert len(lines) == 2, "the README opens with exactly two commands"
    return lines[1].split(" && ", 1)[1].split("#", 1)[0].strip()


def test_readme_test_command_spreads_the_suite_over_two_workers():
    """The suite runs in two worker processes (pytest-xdist is a dev dependency), so it
    fits CI's time on a 2-core machine."""
    command = _readme_test_command()
    assert command == ".venv/bin/python -m pytest -q -n 2"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^    "pytest-xdist>=[0-9.]+",$', pyproject, re.MULTILINE)
    venv_script = (ROOT / "ci" / "setup_triton_venv.sh").read_text()
    assert '"pytest-xdist>=' in venv_script


def test_cpu_job_runs_the_interpreter_tier_on_the_newest_triton():
    run = (ROOT / ".ci" / "run").read_text()
    assert 'json.load(open("ci/matrix.json"))["triton_versions"][-1]' in run
    assert "ci/setup_triton_venv.sh \"$NEXT_TRITON\" .venv-triton-next" in run
    assert "bash ci/interpreter_tier.sh .venv-triton-next/bin/python" in run
    assert _readme_test_command() + " || suite=$?" in run  # the README's command, whole suite
    cpu = (WORKFLOWS / "cpu.yml").read_text()
    assert "run: bash .ci/run" in cpu and "pull_request" in cpu


def test_cpu_job_runs_the_interpreter_tier_on_the_oldest_supported_triton():
    """The oldest release of ci/matrix.json is older than the pinned one, is pyproject's
    floor for the [triton] extra, and gets the interpreter tier in .ci/run."""
    oldest = MATRIX["oldest_triton"]
    assert Version(oldest) < Version(MATRIX["triton_versions"][0])
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'^triton = \["triton>=([0-9.]+)"\]$', pyproject, re.MULTILINE)
    assert floor and Version(oldest).release[:2] == Version(floor.group(1)).release[:2]
    run = (ROOT / ".ci" / "run").read_text()
    assert 'json.load(open("ci/matrix.json"))["oldest_triton"]' in run
    assert "ci/setup_triton_venv.sh \"$OLDEST_TRITON\" .venv-triton-oldest" in run
    assert "bash ci/interpreter_tier.sh .venv-triton-oldest/bin/python" in run


def _fake_python(tmp_path, summary, rc=0):
    """A stand-in for a venv's python: prints a pytest summary line, exits with rc, and
    records its arguments."""
    script = tmp_path / "python"
    script.write_text(f'#!/usr/bin/env bash\necho "$@" > "{tmp_path}/args"\n'
                      f'echo "SKIPPED [3] tests/x.py:1: 5 skipped elsewhere"\n'
                      f'echo "{summary}"\nexit {rc}\n')
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("summary, rc, expected", [
    ("718 passed, 23 skipped, 8 warnings in 234.67s (0:03:54)", 0, 0),
    ("737 passed, 4 skipped in 250.0s", 0, 0),
    ("741 skipped in 8.73s", 0, 1),  # session 48: a skip reason that hid the whole tier
    ("600 passed, 141 skipped in 200.0s", 0, 1),
    ("700 passed, 1 failed, 40 skipped in 200.0s", 1, 1),
])
def test_an_interpreter_tier_fails_when_it_mostly_skipped(tmp_path, summary, rc, expected):
    fake = _fake_python(tmp_path, summary, rc)
    result = subprocess.run(["bash", str(ROOT / "ci" / "interpreter_tier.sh"), str(fake)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == expected, result.stdout + result.stderr
    assert (tmp_path / "args").read_text().split() == ["-m", "pytest", "-q", "-n", "2", "-m",
                                                       "interpreter"]
    assert summary in result.stdout  # the tier's own output is shown
    if rc == 0 and expected:
        assert "at least 90% must run" in result.stderr


def test_gpu_workflow_runs_each_gpu_profile_on_its_runner_label():
    gpu = (WORKFLOWS / "gpu.yml").read_text()
    assert 'json.load(open("ci/matrix.json"))' in gpu
    assert 'runs-on: [self-hosted, "${{ matrix.runner_label }}"]' in gpu
    assert 'triton==${{ matrix.triton }}' in gpu
    assert any(p["gpu_tier"] for p in MATRIX["profiles"])
    assert all(p["runner_label"] for p in MATRIX["profiles"])


def test_each_test_process_has_its_own_probe_cache_folder():
    """conftest.py's folder for the probe's disk cache: one per process of the run (the
    controller's, or each pytest-xdist worker's own), never the user's."""
    import os
    import tempfile

    folder = os.environ["PORTATTN_CACHE_DIR"]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    if os.path.dirname(folder) != tempfile.gettempdir() or \
            not os.path.basename(folder).startswith("portattn-test-cache-"):
        pytest.skip(f"PORTATTN_CACHE_DIR was set by the caller: {folder}")
    assert os.path.basename(folder).startswith(f"portattn-test-cache-{worker}-")
    assert os.path.isdir(folder)
