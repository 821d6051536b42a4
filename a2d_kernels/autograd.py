"""The autograd Function shared by every fused backend.

It owns what is the same for all of them: unpacking per-layer tensors, the
reduction, what is saved for backward, and turning the upstream gradient into the
per-term scale the kernels read on the device.
"""
from __future__ import annotations

import torch

from .dispatch import KernelBackend
from .problem import A2DProblem


def refuse_double_backward() -> None:
    """Raise when a fused backward runs under ``create_graph=True``.

    The kernels' gradients are not differentiable again. Returned as they are, they would
    carry no graph and a Hessian-vector product or gradient penalty through this loss
    would silently miss its second derivative; ``once_differentiable`` does not catch
    that case (the upstream gradient of a loss does not require grad), so this checks
    the grad mode autograd runs the backward in: on only under ``create_graph=True``.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("a2d_kernels: the fused A2D kernels have no double backward (a backward with "
                           "create_graph=True reached them); use backend='reference' for higher-order gradients")


class FusedA2DKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: KernelBackend, normalize: str, reduction: str, weight, bias,
                key_valid, query_valid, n_student: int, *maps):
        problem = A2DProblem(
            student=tuple(maps[:n_student]), teacher=tuple(maps[n_student:]),
            weight=weight, bias=bias, key_valid=key_valid, query_valid=query_valid,
            normalize=normalize, reduction=reduction,
        )
        kl, saved = backend.forward(problem)
        # Inputs are alive anyway; ``saved`` holds only O(B*Ct*T) statistics.
        ctx.save_for_backward(weight, bias, key_valid, query_valid, *maps, *saved)
        ctx.backend = backend
        ctx.meta = (normalize, reduction, n_student, len(maps))
        return problem.reduce(kl)

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward()
        normalize, reduction, n_student, n_maps = ctx.meta
        weight, bias, key_valid, query_valid, *rest = ctx.saved_tensors
        maps, saved = rest[:n_maps], tuple(rest[n_maps:])
        problem = A2DProblem(
            student=tuple(maps[:n_student]), teacher=tuple(maps[n_student:]),
            weight=weight, bias=bias, key_valid=key_valid, query_valid=query_valid,
            normalize=normalize, reduction=reduction,
        )
        grad_scale = problem.grad_scale(grad_loss)
        need_student = any(ctx.needs_input_grad[8:8 + n_student])
        d_student, d_weight, d_bias = ctx.backend.backward(problem, saved, grad_scale, need_student)
        n_teacher = n_maps - n_student
        return (None, None, None, d_weight, d_bias, None, None, None,
                *d_student, *([None] * n_teacher))


def fused_a2d_kl(backend: KernelBackend, problem: A2DProblem) -> torch.Tensor:
    return FusedA2DKL.apply(
        backend, problem.normalize, problem.reduction, problem.weight, problem.bias,
        problem.key_valid, problem.query_valid, len(problem.student),
        *problem.student, *problem.teacher,
    )
