#!/usr/bin/env bash
# Install everything the test suite needs (a CPU build of torch when torch is
# missing), build the package (and the CUDA extension when nvcc is present), then run
# the tests. Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
source scripts/_install_torch.sh
"$PY" -m pip install --quiet -e ".[test]"
"$PY" -m pytest -q "$@"
