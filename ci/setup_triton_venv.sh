#!/usr/bin/env bash
# Make a venv for the interpreter tier on another Triton release: the torch pinned in
# ci/constraints.txt, Triton VERSION, numpy, pytest and pytest-xdist, and portattn
# (editable, no deps).
# numpy < 2.4 up to Triton 3.6 (its interpreter and 3.5's fail on runtime-bounded loops
# with numpy 2.4), free after.
# Usage: bash ci/setup_triton_venv.sh VERSION DIR
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$1
DIR=$2
PYTHON=${PYTHON:-python3}
TORCH=$(grep -E '^torch==' ci/constraints.txt)
rm -rf "$DIR"
"$PYTHON" -m venv "$DIR"
NUMPY=numpy
if [ "$(printf '%s\n' "$VERSION" 3.6.0 | sort -V | head -n 1)" = "$VERSION" ]; then
  NUMPY="numpy<2.4"
fi
"$DIR/bin/python" -m pip install -q --no-compile --disable-pip-version-check "$TORCH" "triton==$VERSION" \
  "$NUMPY" "pytest>=8" "pytest-xdist>=3.5"
"$DIR/bin/python" -m pip install -q --no-compile --disable-pip-version-check --no-deps -e .
"$DIR/bin/python" -c "import torch, triton, numpy, portattn; print('$DIR: torch', \
torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
