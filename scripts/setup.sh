#!/usr/bin/env bash
# Set up portattn in ./.venv on a fresh machine: torch, Triton, the package (editable) and
# the test tools. Versions that must match CI and the GPU machine are pinned in
# ci/constraints.txt (torch 2.13.0: a CPU-only machine here installs its local CPU wheel).
# --no-compile: Python compiles the modules it imports on first use; precompiling all of
# torch and Triton at install time costs more than a minute on a small machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --no-compile --disable-pip-version-check -c ci/constraints.txt torch
.venv/bin/python -m pip install -q --no-compile --disable-pip-version-check -c ci/constraints.txt \
  -e ".[triton,dev]"
.venv/bin/python -c "import torch, triton, portattn; print('portattn', portattn.__version__, \
'| torch', torch.__version__, '| triton', triton.__version__)"
