#!/usr/bin/env bash
# Make a venv for the interpreter tier on another Triton release: the torch pinned in
# ci/constraints.txt, Triton VERSION, numpy and pytest, and portattn (editable, no deps).
# Usage: bash ci/setup_triton_venv.sh VERSION DIR
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$1
DIR=$2
PYTHON=${PYTHON:-python3}
TORCH=$(grep -E '^torch==' ci/constraints.txt)
rm -rf "$DIR"
"$PYTHON" -m venv "$DIR"
# numpy is left free: the numpy<2.4 pin is Triton 3.6's interpreter bug, not a newer one's.
"$DIR/bin/python" -m pip install -q --no-compile --disable-pip-version-check "$TORCH" "triton==$VERSION" \
  numpy "pytest>=8"
"$DIR/bin/python" -m pip install -q --no-compile --disable-pip-version-check --no-deps -e .
"$DIR/bin/python" -c "import torch, triton, numpy, portattn; print('next venv: torch', \
torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
