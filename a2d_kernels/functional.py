"""``a2d_kl``: the functional form of the A2D attention-distillation loss."""
from __future__ import annotations

from typing import Optional

import torch

from .custom_ops import fused_a2d_kl
from .dispatch import select_backend
from .problem import Maps, make_problem
from .reference import a2d_kl_reference


def a2d_kl(
    student_maps: Maps,
    teacher_maps: Maps,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    normalize: str = "map",
    reduction: str = "sum",
    key_padding_mask: Optional[torch.Tensor] = None,
    query_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """KL divergence between each teacher head and the learned mix of student heads.

    Args:
        student_maps: per-layer ``(B, H_l, T, K)`` attention probabilities (a list or
            tuple, as Hugging Face ``output_attentions=True`` returns them) or one
            stacked ``(B, Cs, T, K)`` tensor. Channel order is layer-major.
        teacher_maps: the same for the teacher, ``Ct`` channels; never differentiated.
        weight: ``(Ct, Cs)`` mixing matrix (a ``Conv2d(Cs, Ct, 1).weight`` also works).
        bias: ``(Ct,)`` or None.
        normalize: ``"map"`` (each whole T*K map is one distribution; the authors'
            released code) or ``"row"`` (each query row is a distribution over keys).
        reduction: ``"sum"`` (as released), ``"mean"`` (per KL term) or
            ``"batchmean"`` (per batch element).
        key_padding_mask: ``(B, K)`` bool, True marks padded keys (excluded), as in
            ``torch.nn.MultiheadAttention``.
        query_mask: ``(B, T)`` bool, True marks padded queries (excluded).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        0-dim loss tensor, fp32 (fp64 when the inputs are fp64).
    """
    problem = make_problem(
        student_maps, teacher_maps, weight, bias,
        normalize=normalize, reduction=reduction,
        key_padding_mask=key_padding_mask, query_mask=query_mask,
    )
    kernels = select_backend(backend, problem)
    if kernels is None:
        return a2d_kl_reference(problem)
    return fused_a2d_kl(kernels, problem)
