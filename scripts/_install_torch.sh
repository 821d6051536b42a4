# Sourced by the scripts: install a CPU build of torch when none is installed.
# A plain `pip install torch` would pull a multi-GB CUDA build; the CPU wheel comes
# from PyTorch's CPU index, or from a local wheel folder when pip is set up with one.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[a2d] torch not found: installing a CPU build"
  # The CPU index first: the plain install (PyPI, or a local wheel folder pip is set up
  # with) is the fallback, since from PyPI on Linux it is the multi-GB CUDA build.
  "$PY" -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || "$PY" -m pip install --quiet "torch==2.13.0"
fi
