#!/usr/bin/env bash
# The README's main job: the whole A2D pipeline on the embedded corpus (en->de pairs from
# the gettext catalogs installed on this machine; nothing is downloaded), tiny presets,
# about 15 minutes on 2 CPU cores. Prints teacher / no-KD / word-KD / A2D student BLEU.
# Usage: bash scripts/demo.sh [a2d-train demo options, e.g. --run-dir runs/demo --minutes 13]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
source scripts/_install_torch.sh
"$PY" -m pip install --quiet -e ".[train]"
"$PY" -m a2d_trainer.cli demo "$@"
