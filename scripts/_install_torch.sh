# Sourced by the scripts: install a CPU build of torch when none is installed.
# A plain `pip install torch` from PyPI on Linux is the multi-GB CUDA build, so it is
# never used: first the CPU wheel by its exact local version (only a local wheel folder
# pip is set up with can hold it: PyPI has no "+cpu" versions, so this fails fast
# elsewhere), else PyTorch's CPU index.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[a2d] torch not found: installing a CPU build"
  "$PY" -m pip install --quiet "torch==2.13.0+cpu" 2>/dev/null \
    || "$PY" -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
  "$PY" -c "import torch; print('[a2d] installed torch', torch.__version__)"
fi
