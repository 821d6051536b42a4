# Sourced by the scripts: install a CPU build of torch when none is installed.
# A plain `pip install torch` from PyPI on Linux is the multi-GB CUDA build, so it is
# never used: first a wheel from a local folder pip is set up with (find-links; no
# index is asked, so nothing else can be picked), else PyTorch's CPU index.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[a2d] torch not found: installing a CPU build"
  "$PY" -m pip install --quiet --no-index torch 2>/dev/null \
    || "$PY" -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
  "$PY" -c "import torch; print('[a2d] installed torch', torch.__version__)"
fi
