#!/usr/bin/env bash
# Fetch wheels for the GPU machine (no network there) into .whl/, for
#     run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# which installs them offline (--no-index --no-deps) into /tmp/a2d_site before anything
# else. Not needed today: every package the GPU check uses (torch, triton, pybind11,
# ninja, setuptools, pytest, pytest-xdist, pytest-timeout, numpy, matplotlib,
# transformers, sentencepiece, sacrebleu, tqdm) is on that image
# (/work/.library/device/KINDS.md). Use it for one that is not, e.g. the benchmark's
# optional peer pipeline:
#
#     bash scripts/fetch_wheels.sh liger-kernel==0.6.4
#
# Each NAME==VERSION is fetched without its dependencies (name the missing ones too;
# `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist` lists them) for
# CPython 3.12 on manylinux x86_64, the GPU image's Python. .whl/ is git-ignored
# (.gitignore), so it travels only when `carry` names it (64 MiB per call,
# the working tree included). Keep one version of each package: two stop the install.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -eq 0 ]; then
  echo "usage: bash scripts/fetch_wheels.sh NAME==VERSION [NAME==VERSION ...]" >&2
  exit 2
fi
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 linux_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "$@"
du -sh .whl
ls .whl
