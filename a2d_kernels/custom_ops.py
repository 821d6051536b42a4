"""The fused A2D path as two ``torch.library`` custom ops, so ``torch.compile`` can hold it.

Why ops and not a plain ``autograd.Function``: the Triton and CUDA backends launch
kernels on raw pointers (``data_ptr()``), which fails on the fake tensors that
``torch.compile`` traces with. A custom op is opaque to the tracer: Dynamo records
one call, runs the op's *fake* implementation to learn the output shapes, and the
real kernels run only when the compiled graph executes. So a training step that calls
the loss compiles with ``fullgraph=True`` and no graph break, whichever backend runs.

    a2d_kernels::a2d_kl_fwd(str backend, Tensor[] student, Tensor[] teacher,
        Tensor weight, Tensor? bias, Tensor? key_valid, Tensor? query_valid,
        str normalize, str reduction) -> (Tensor loss, Tensor[] saved)
    a2d_kernels::a2d_kl_bwd(str backend, Tensor grad_loss, Tensor[] student,
        Tensor[] teacher, Tensor weight, Tensor? bias, Tensor? key_valid,
        Tensor? query_valid, Tensor[] saved, str normalize, str reduction,
        bool need_student_grad) -> (Tensor[] d_student, Tensor d_weight, Tensor[] d_bias)

``loss`` is the *reduced* loss (0-dim; fp32, fp64 for fp64 inputs), so the backward op
receives the 0-dim upstream gradient and hands the kernels the per-term ``grad_scale``
of the ``KernelBackend`` contract. ``saved`` are the backend's O(B*Ct*T) statistics;
``d_student`` is empty when no student map needs a gradient; ``d_bias`` holds one
tensor when there is a bias, none otherwise (a custom op cannot return ``Tensor?``).

The fake implementations allocate exactly what the real ones return. The statistics
differ per backend, so each backend describes them with
``saved_specs(problem) -> sequence of (shape, dtype)`` (contiguous, on the problem's
device), one entry per tensor its ``forward`` returns in ``saved``. Gradients are laid
out like their inputs (``torch.empty_like``); the real op copies any that a backend
returned in another layout, so compiled code can trust the fake's strides.

Only compiled code goes through the ops: in eager mode :func:`fused_a2d_kl` calls the
same backend methods through ``autograd.FusedA2DKL``, which costs far less Python time.

``backend`` names a registered kernel backend, or ``"reference"``: the pure-PyTorch
oracle behind the same contract (:data:`REFERENCE_KERNELS`), the CPU kernel of the ops
that ``torch.library.opcheck`` and the CPU tests exercise.

Triton: the ops stay opaque to Inductor rather than using ``triton_op`` +
``wrap_triton``, which would also reject kernels under ``TRITON_INTERPRET=1``
(pytorch#152868); here the raw launch always runs inside the real implementation.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import reference
from .autograd import fused_a2d_kl as _eager_fused_a2d_kl
from .dispatch import KernelBackend, _load
from .problem import A2DProblem

__all__ = ["fused_a2d_kl", "op_a2d_kl", "ReferenceKernels", "REFERENCE_KERNELS", "a2d_kl_fwd", "a2d_kl_bwd"]


class ReferenceKernels:
    """The ``KernelBackend`` contract computed in plain PyTorch, at the input's device.

    ``forward`` is the oracle's ``kl_per_map``; ``backward`` is the closed-form gradient
    of DESIGN.md section 1 (map mode ``dZ = g*(q - p)``, row mode ``dZ = g*(q*P - p)``
    on valid entries), checked against the oracle's autograd in the tests. It saves
    nothing and recomputes ``Z`` in backward: it is a reference, not a fast path.
    """

    name = "reference"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None

    def unsupported_reason(self, problem: A2DProblem) -> Optional[str]:
        return None

    def saved_specs(self, problem: A2DProblem) -> Tuple[Tuple[Tuple[int, ...], torch.dtype], ...]:
        return ()

    def forward(self, problem: A2DProblem) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        return reference.kl_per_map(problem), ()

    def backward(self, problem: A2DProblem, saved: Tuple[Tensor, ...], grad_scale: Tensor,
                 need_student_grad: bool):
        # fp32 (fp64) whatever autocast region the backward runs in, as kl_per_map.
        with torch.autocast(problem.device.type, enabled=False):
            return self._backward(problem, grad_scale, need_student_grad)

    def _backward(self, problem: A2DProblem, grad_scale: Tensor, need_student_grad: bool):
        dtype = reference.compute_dtype(problem)
        valid = reference.valid_entries(problem)
        S = reference.stacked(problem.student, dtype, valid, 0.0)
        Z = reference.mixed_logits(problem, S)
        B, Ct, T, K = Z.shape
        masked = reference._MASKED
        if problem.normalize == "map":
            A = reference.stacked(problem.teacher, dtype, valid, masked)
            if valid is not None:
                Z = torch.where(valid, Z, masked)
            q = torch.softmax(Z.reshape(B, Ct, -1), dim=-1).reshape(B, Ct, T, K)
            p = torch.softmax(A.reshape(B, Ct, -1), dim=-1).reshape(B, Ct, T, K)
            dZ = q - p
        else:
            if problem.key_valid is not None:
                Z = torch.where(problem.key_valid[:, None, None, :], Z, masked)
            q = torch.softmax(Z, dim=-1)
            # P: the teacher row's mass over the keys that take part (1 for a full row
            # that sums to one); the gradient of -sum_k p_k log q_k is q*P - p.
            p = reference.stacked(problem.teacher, dtype, valid, 0.0)
            dZ = q * p.sum(-1, keepdim=True) - p
        if valid is not None:
            dZ = torch.where(valid, dZ, 0.0)
        dZ = dZ * grad_scale.to(dtype)

        d_weight = torch.einsum("bctx,bktx->ck", dZ, S).to(problem.weight.dtype)
        d_bias = None if problem.bias is None else dZ.sum(dim=(0, 2, 3)).to(problem.bias.dtype)
        if not need_student_grad:
            return [None] * len(problem.student), d_weight, d_bias
        # One fresh tensor per layer (op outputs may not alias each other, so no split views).
        W = problem.weight.to(dtype)
        d_student, first = [], 0
        for s in problem.student:
            heads = s.shape[1]
            d_student.append(torch.einsum("ck,bctx->bktx", W[:, first:first + heads], dZ).to(s.dtype))
            first += heads
        return d_student, d_weight, d_bias


REFERENCE_KERNELS = ReferenceKernels()


def _kernels(name: str) -> KernelBackend:
    if name == REFERENCE_KERNELS.name:
        return REFERENCE_KERNELS
    backend, why = _load(name)
    if backend is None:
        raise RuntimeError(f"a2d_kernels custom op: backend {name!r} {why}")
    return backend


def _problem(student, teacher, weight, bias, key_valid, query_valid, normalize, reduction) -> A2DProblem:
    # The ops receive arguments that make_problem already checked (fused_a2d_kl is the
    # only intended caller), so they are only re-packed here, never re-validated.
    return A2DProblem(
        student=tuple(student), teacher=tuple(teacher), weight=weight, bias=bias,
        key_valid=key_valid, query_valid=query_valid, normalize=normalize, reduction=reduction,
    )


@torch.library.custom_op("a2d_kernels::a2d_kl_fwd", mutates_args=())
def a2d_kl_fwd(
    backend: str,
    student: List[Tensor],
    teacher: List[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    key_valid: Optional[Tensor],
    query_valid: Optional[Tensor],
    normalize: str,
    reduction: str,
) -> Tuple[Tensor, List[Tensor]]:
    problem = _problem(student, teacher, weight, bias, key_valid, query_valid, normalize, reduction)
    kl, saved = _kernels(backend).forward(problem)
    return problem.reduce(kl), [t.contiguous() for t in saved]


@a2d_kl_fwd.register_fake
def _a2d_kl_fwd_fake(backend, student, teacher, weight, bias, key_valid, query_valid, normalize, reduction):
    problem = _problem(student, teacher, weight, bias, key_valid, query_valid, normalize, reduction)
    device = problem.device
    loss = torch.empty((), dtype=reference.compute_dtype(problem), device=device)
    saved = [torch.empty(shape, dtype=dtype, device=device)
             for shape, dtype in _kernels(backend).saved_specs(problem)]
    return loss, saved


@torch.library.custom_op("a2d_kernels::a2d_kl_bwd", mutates_args=())
def a2d_kl_bwd(
    backend: str,
    grad_loss: Tensor,
    student: List[Tensor],
    teacher: List[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    key_valid: Optional[Tensor],
    query_valid: Optional[Tensor],
    saved: List[Tensor],
    normalize: str,
    reduction: str,
    need_student_grad: bool,
) -> Tuple[List[Tensor], Tensor, List[Tensor]]:
    problem = _problem(student, teacher, weight, bias, key_valid, query_valid, normalize, reduction)
    d_student, d_weight, d_bias = _kernels(backend).backward(
        problem, tuple(saved), problem.grad_scale(grad_loss), need_student_grad)
    d_student = [_layout_like(d, s) for d, s in zip(d_student, student)] if need_student_grad else []
    d_bias = [] if d_bias is None else [_layout_like(d_bias, bias)]
    return d_student, _layout_like(d_weight, weight), d_bias


def _layout_like(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` with the strides of ``torch.empty_like(like)``, as the fake promises.

    Compiled code trusts the fake's strides, so a backend that picks another layout
    (for example contiguous dS for a permuted input) gets copied here rather than
    read wrongly downstream. No copy in the usual case.
    """
    if grad.stride() == torch.empty_like(like, device="meta").stride():
        return grad
    return torch.empty_like(like).copy_(grad)


@a2d_kl_bwd.register_fake
def _a2d_kl_bwd_fake(backend, grad_loss, student, teacher, weight, bias, key_valid, query_valid, saved,
                     normalize, reduction, need_student_grad):
    # Gradients are laid out like their inputs (torch.empty_like), as _layout_like ensures.
    d_student = [torch.empty_like(s) for s in student] if need_student_grad else []
    d_bias = [] if bias is None else [torch.empty_like(bias)]
    return d_student, torch.empty_like(weight), d_bias


def _setup_context(ctx, inputs, output):
    backend, student, teacher, weight, bias, key_valid, query_valid, normalize, reduction = inputs
    _, saved = output
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(weight, bias, key_valid, query_valid, *student, *teacher, *saved)
    ctx.meta = (backend, normalize, reduction, len(student), len(teacher))


def _backward(ctx, grad_loss, _grad_saved):
    backend, normalize, reduction, n_student, n_teacher = ctx.meta
    weight, bias, key_valid, query_valid, *rest = ctx.saved_tensors
    student = rest[:n_student]
    teacher = rest[n_student:n_student + n_teacher]
    saved = rest[n_student + n_teacher:]
    need_student = any(ctx.needs_input_grad[1])
    d_student, d_weight, d_bias = a2d_kl_bwd(
        backend, grad_loss, student, teacher, weight, bias, key_valid, query_valid, saved,
        normalize, reduction, need_student,
    )
    # List arguments take a list of per-tensor gradients (None where there is none).
    return (None, d_student if need_student else [None] * n_student, [None] * n_teacher, d_weight,
            d_bias[0] if d_bias else None, None, None, None, None)


a2d_kl_fwd.register_autograd(_backward, setup_context=_setup_context)


def op_a2d_kl(backend_name: str, problem: A2DProblem) -> Tensor:
    """The reduced A2D loss of a checked ``problem`` through the custom ops (differentiable)."""
    loss, _ = a2d_kl_fwd(
        backend_name, list(problem.student), list(problem.teacher), problem.weight, problem.bias,
        problem.key_valid, problem.query_valid, problem.normalize, problem.reduction,
    )
    return loss


def fused_a2d_kl(backend: KernelBackend, problem: A2DProblem) -> Tensor:
    """The reduced A2D loss of a checked ``problem``, computed by ``backend``'s kernels.

    Under ``torch.compile`` this is the custom ops; in eager mode it is the plain
    ``autograd.FusedA2DKL``, which runs the same backend methods with about a quarter of
    the Python overhead: a Python custom op adds pytree flattening, alias checks and a
    dispatcher round trip per call (measured ~1.7 ms per forward+backward on a 2-core
    CPU), which would show at the small shapes where the kernels themselves are fast.
    """
    if torch.compiler.is_compiling():
        return op_a2d_kl(backend.name, problem)
    return _eager_fused_a2d_kl(backend, problem)
