#!/usr/bin/env bash
# One call on a GPU machine (e.g. the device tool's run): build the package with its
# CUDA extension, run the GPU tests, then check every fused backend against the
# reference and time everything (benchmarks/gpu_check.py). Everything lands in $OUT
# (default benchmarks/results/<date>-gpu); the summary is printed last.
#
# The GPU machine may have no network: nothing is downloaded. Packages it lacks
# (pybind11 for the build; sacrebleu etc. are not needed here) can be carried as wheels
# in ./wheels, installed with --no-index. Not yet run on a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/$(date -u +%F)-gpu}"
mkdir -p "$OUT"

{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$OUT/environment.txt" 2>&1
[ -d wheels ] && "$PY" -m pip install --quiet --no-index --find-links wheels pybind11 ninja >>"$OUT/build.log" 2>&1
# No build isolation (it would fetch build requirements) and no dependency resolution
# (the machine's torch and triton are the ones to test).
A2D_BUILD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1 \
  || { echo "CUDA build failed; see $OUT/build.log (the Triton checks still run)"; tail -5 "$OUT/build.log";
       A2D_BUILD_CUDA=0 "$PY" -m pip install --quiet --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1; }
"$PY" -c "import a2d_kernels, json; print(json.dumps(a2d_kernels.backends(), indent=1))" | tee "$OUT/backends.json"

# On a GPU these files run every case on the device (the GPU-only ones included).
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_cuda.py tests/test_qk.py \
  tests/test_compile.py > "$OUT/gpu_tests.log" 2>&1
echo "GPU tests: $(tail -1 "$OUT/gpu_tests.log")"

"$PY" benchmarks/gpu_check.py --out "$OUT" --budget-s "${A2D_CHECK_BUDGET_S:-380}"
