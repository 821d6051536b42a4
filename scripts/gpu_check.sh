#!/usr/bin/env bash
# One offline call on a GPU machine: build the CUDA extension (A2D_BUILD_CUDA=1, this
# GPU's architecture only), check every fused backend against the float64 reference,
# then time everything (bench_a2d.py --isolate, bench_e2e.py).
# The stages and their timeouts are benchmarks/gpu_check.py's (its docstring); this
# wrapper sets up the environment, keeps the whole run inside one deadline and always
# exits 0 with a summary as its last lines, so the output comes back whatever failed.
#
# The device tool (see /work/.library/device/README.md), one call, nothing to carry:
#
#     run(command="bash scripts/gpu_check.sh", timeout_s=600)
#
# optionally prefixed with A2D_COMMIT=<sha> (the machine gets no .git; the summary
# also records a hash of the sources). It takes about 9.5 minutes plus the machine's
# start, of the session's 30 device minutes. The first call checks correctness (the
# check stage, up to ~250 s) and gives the benchmark what is left, about 3 minutes
# (realistic shapes first: the targets). A second call runs the GPU test files, the
# QK-mode T sweep (issue 8, at most 180 s) and more of the benchmark:
#
#     run(command="A2D_STAGES=env,build,tests,qk,bench bash scripts/gpu_check.sh", timeout_s=600)
#
# What comes back in $OUT (at most 8 files, all
# refreshed after every stage, so a run cut short still returns what it did):
# summary.txt, environment.json, check.json, bench_results.json, bench_table.md,
# e2e.json and gpu_check_all.tar.gz (every log, per-contender parts, plots, the JUnit
# XML of the tests). The summary is also the end of stdout (the reply's output_tail).
#
# Nothing is downloaded and nothing is pip-installed: the package runs from this
# checkout (PYTHONPATH), the extension is built in place with the image's nvcc,
# pybind11 and ninja (listed in /work/.library/device/KINDS.md). Should a Python
# package be missing there, fetch its wheel here into .whl/ (git-ignored, see
# scripts/fetch_wheels.sh) and add carry=[".whl"]: it is then
# installed with --no-index --no-deps into /tmp/a2d_site first.
#
# Elsewhere: `OUT=some/dir bash scripts/gpu_check.sh` (full results under a work
# folder in /tmp, the 7 files in some/dir); without OUT everything goes to
# benchmarks/results/<date>-gpu-check/.
#
# Knobs: A2D_DEADLINE_S (default 550: all stages, of the tool's 600 s), A2D_STAGES
# (default env,build,check,bench,e2e; "all" is every stage), A2D_CUDA_ARCHS (default: the GPU's
# compute capability), A2D_SMOKE=1 (no GPU: checks this script on a CPU machine),
# PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.." || { echo "gpu_check.sh: cannot cd to the repository"; exit 0; }
ROOT=$PWD
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
DEADLINE="${A2D_DEADLINE_S:-550}"

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check.sh: $PY not found; nothing was run"
  exit 0
fi

if [ -n "${OUT:-}" ]; then
  WORK="${A2D_WORK:-/tmp/a2d_gpu_check-$(date -u +%Y%m%dT%H%M%S)}"
  EXPORT=(--export "$OUT")
  mkdir -p "$OUT"
else
  WORK="${A2D_WORK:-benchmarks/results/$(date -u +%F)-gpu-check}"
  EXPORT=()
fi
mkdir -p "$WORK"

# Carried wheels (optional): offline, no dependency resolution, into a private folder.
for dir in .whl wheels; do
  if compgen -G "$dir/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
         --upgrade --target /tmp/a2d_site "$dir"/*.whl >"$WORK/wheels.log" 2>&1; then
      export PYTHONPATH="/tmp/a2d_site${PYTHONPATH:+:$PYTHONPATH}"
      echo "gpu_check.sh: installed the wheels in $dir/ into /tmp/a2d_site"
    else
      echo "gpu_check.sh: installing the wheels in $dir/ failed (see $WORK/wheels.log); going on without them"
    fi
  fi
done

# The package from this checkout, not installed: a2d_kernels from the root (the
# extension is built in place there), a2d_trainer from python/.
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

left=$(( DEADLINE - SECONDS ))
[ "$left" -lt 60 ] && left=60
SMOKE=()
[ "${A2D_SMOKE:-0}" = "1" ] && SMOKE=(--smoke)

# gpu_check.py keeps its own deadline; `timeout` is the backstop should it hang itself
# (TERM first: it then kills its running step, writes the summary and exports).
timeout -k 15 "$(( left + 25 ))" "$PY" benchmarks/gpu_check.py --out "$WORK" ${EXPORT[@]+"${EXPORT[@]}"} \
  --stages "${A2D_STAGES:-env,build,check,bench,e2e}" --deadline-s "$left" ${SMOKE[@]+"${SMOKE[@]}"}
rc=$?

if [ "$rc" -ne 0 ]; then
  echo
  echo "==== gpu_check.sh: benchmarks/gpu_check.py exited with $rc (124: killed at its backstop timeout) ===="
  for f in "$WORK"/*.log; do
    [ -f "$f" ] || continue
    echo "--- last lines of $f"
    tail -n 5 "$f"
  done
  if [ -n "${OUT:-}" ] && [ ! -f "$OUT/gpu_check_all.tar.gz" ]; then
    tar -czf "$OUT/gpu_check_all.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null \
      && echo "gpu_check.sh: packed $WORK into $OUT/gpu_check_all.tar.gz"
  fi
  if [ -f "$WORK/summary.txt" ]; then
    echo
    echo "==== gpu_check summary (as last written) ===="
    cat "$WORK/summary.txt"
  fi
fi
echo "gpu_check.sh: done in ${SECONDS}s (gpu_check.py rc=$rc); results under $WORK${OUT:+, exported to $OUT}"
exit 0
