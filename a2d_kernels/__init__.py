"""a2d-kernels: fused Align-to-Distill (A2D) attention-distillation loss.

    >>> from a2d_kernels import A2DLoss, A2DDistiller, a2d_kl, a2d_kl_qk, backends
"""
from . import reference
from .dispatch import backends
from .distill import A2DDistiller
from .functional import a2d_kl
from .module import A2DLoss
from .problem import A2DProblem, make_problem
from .qk import a2d_kl_qk

__all__ = ["A2DLoss", "A2DDistiller", "a2d_kl", "a2d_kl_qk", "backends", "reference", "A2DProblem", "make_problem"]
__version__ = "0.1.0"
