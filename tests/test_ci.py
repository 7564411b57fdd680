"""The CI configuration agrees with its one source of truth, ci/matrix.json."""

from __future__ import annotations

import json
import re
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
    assert ".venv-triton-next/bin/python -m pytest -q -n 2 -m interpreter" in run
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
    assert ".venv-triton-oldest/bin/python -m pytest -q -n 2 -m interpreter" in run


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
