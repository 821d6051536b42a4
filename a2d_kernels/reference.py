"""Pure-PyTorch A2D loss: the oracle every other backend is compared with.

It materializes everything (the mixed logits Z, both log-softmaxes, the elementwise
KL) and lets autograd derive the gradients, so it is slow and memory-hungry on
purpose: it is written to be obviously the formula of DESIGN.md section 1.
Arithmetic is fp32 (fp64 when any input is fp64), whatever the input dtype.
"""
from __future__ import annotations

import torch

from .problem import A2DProblem

# Masked logits are replaced by this finite value rather than -inf: a fully masked
# row or map then stays finite (its terms are zeroed explicitly) and autograd never
# sees inf - inf. exp(_MASKED - max) underflows to exactly 0 in fp32 and fp64.
_MASKED = -1e30


def compute_dtype(problem: A2DProblem) -> torch.dtype:
    """fp64 when any input is fp64, else fp32: the dtype of the loss and the math."""
    tensors = (*problem.student, *problem.teacher, problem.weight)
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def valid_entries(problem: A2DProblem):
    """(B, 1, T, K) bool: which (query, key) entries take part, or None for all."""
    if problem.key_valid is None and problem.query_valid is None:
        return None
    B, T, K = problem.batch, problem.queries, problem.keys
    valid = torch.ones(B, 1, T, K, dtype=torch.bool, device=problem.device)
    if problem.key_valid is not None:
        valid = valid & problem.key_valid[:, None, None, :]
    if problem.query_valid is not None:
        valid = valid & problem.query_valid[:, None, :, None]
    return valid


def stacked(maps, dtype: torch.dtype, valid, fill: float) -> torch.Tensor:
    """The per-layer maps concatenated along channels in ``dtype``, entries outside
    ``valid`` (when given) set to ``fill``.

    Masked positions may hold anything (a fully padded softmax row is NaN), so they are
    replaced before any arithmetic: a NaN kept there would reach the gradients through
    0 * NaN even where the forward selects it away.
    """
    X = torch.cat([m.to(dtype) for m in maps], dim=1)
    return X if valid is None else torch.where(valid, X, fill)


def mixed_logits(problem: A2DProblem, S: torch.Tensor) -> torch.Tensor:
    """Z[b, c] = sum_k weight[c, k] * S[b, k] + bias[c], shape (B, Ct, T, K), from the
    stacked student maps ``S``."""
    dtype = S.dtype
    Z = torch.einsum("ck,bktx->bctx", problem.weight.to(dtype), S)
    if problem.bias is not None:
        Z = Z + problem.bias.to(dtype)[None, :, None, None]
    return Z


def kl_per_map(problem: A2DProblem) -> torch.Tensor:
    """Summed KL of every (batch, teacher channel) pair, shape (B, Ct).

    In "row" mode this is the sum over that map's valid query rows. Autocast is off
    inside: under a bf16 autocast region the mixing einsum would otherwise run in bf16,
    while the spec (and every fused backend) accumulates in fp32.
    """
    with torch.autocast(problem.device.type, enabled=False):
        return _kl_per_map(problem)


def _kl_per_map(problem: A2DProblem) -> torch.Tensor:
    dtype = compute_dtype(problem)
    valid = valid_entries(problem)
    Z = mixed_logits(problem, stacked(problem.student, dtype, valid, 0.0))
    B, Ct = Z.shape[:2]

    if problem.normalize == "map":
        A = stacked(problem.teacher, dtype, valid, _MASKED)
        if valid is not None:
            Z = torch.where(valid, Z, _MASKED)
        log_q = torch.log_softmax(Z.reshape(B, Ct, -1), dim=-1)
        log_p = torch.log_softmax(A.reshape(B, Ct, -1), dim=-1)
        terms = log_p.exp() * (log_p - log_q)
        if valid is not None:
            terms = torch.where(valid.reshape(B, 1, -1), terms, 0.0)
        return terms.sum(-1)

    # "row": each query row is a distribution over its valid keys; the teacher row is
    # used as given probabilities, and p = 0 terms contribute 0 (xlogy(0, 0) = 0).
    A = stacked(problem.teacher, dtype, valid, 0.0)
    if problem.key_valid is not None:
        Z = torch.where(problem.key_valid[:, None, None, :], Z, _MASKED)
    log_q = torch.log_softmax(Z, dim=-1)
    terms = torch.xlogy(A, A) - A * log_q
    if valid is not None:
        terms = torch.where(valid, terms, 0.0)
    return terms.sum(dim=(-2, -1))


def a2d_kl_reference(problem: A2DProblem) -> torch.Tensor:
    """The reduced A2D loss of ``problem`` (0-dim), differentiable by autograd."""
    return problem.reduce(kl_per_map(problem))
