"""Test configuration shared by every test module.

Without a GPU, Triton kernels run in the interpreter on the CPU. The switch must be
set before any module defining a ``@triton.jit`` kernel is imported, so it is set
here, at collection start, before the tests import ``a2d_kernels``.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
