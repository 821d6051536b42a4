"""QK mode: the A2D loss computed from queries and keys, with no attention map in memory.

A model that hands the loss its (B, H, T, K) probability maps must materialize them,
which rules out fused attention (SDPA / FlashAttention) and costs O(B*H*T*K) memory per
layer. In QK mode it hands over each layer's queries and keys instead, and the loss
recomputes the probabilities tile by tile (DESIGN.md section 2, "QK mode").

Definition (what every backend computes). For each layer, head, batch element::

    S[t, k] = softmax_k(scale * q[t] . k[k])   over the keys *visible* from query t

A key is visible when it is not padding (``key_padding_mask``) and, when ``causal``,
when ``k <= t``; invisible keys get probability exactly 0. A query row with no visible
key at all (every key padded, or causal with left padding) is defined as all zeros,
the same convention as FlashAttention's output for such rows. The loss is then exactly

    a2d_kl(S_student, S_teacher, weight, bias, normalize=..., reduction=...,
           key_padding_mask=key_padding_mask, query_mask=query_mask)

on those maps. In particular the causal mask is *not* a loss mask: entries above the
diagonal are ordinary map entries with probability 0 (in "map" mode they are part of
each map's distribution, exactly as when causal maps are passed to ``a2d_kl``); only
``key_padding_mask`` and ``query_mask`` remove entries from the loss.

Use from attention layers that run SDPA / FlashAttention: keep each layer's ``q`` and
``k`` (``(B, H, T, d)``, after any rotary embedding, before the softmax scale) and call::

    loss = a2d_kl_qk(student_qs, student_ks, teacher_qs, teacher_ks, aam.weight, aam.bias,
                     causal=is_decoder_self_attention, key_padding_mask=pad, query_mask=qpad)

Backends: ``"triton"`` (``ops/triton_qk.py``; nothing of size T*K is ever allocated),
``"reference"`` (materializes the maps and calls ``reference.a2d_kl_reference``: the
oracle), ``"auto"`` (Triton on CUDA, else the reference). Under ``torch.compile`` the
Triton path runs through the custom ops ``a2d_kernels::a2d_kl_qk_fwd`` / ``_bwd``.

Inputs given per layer are concatenated along the head axis before the kernels run.
That copy is O(B*H*T*d), negligible next to one map, and it lets non-contiguous
projections (``q.transpose(1, 2)``) in without special cases; gradients come back to
each layer through the concatenation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .autograd import refuse_double_backward
from .custom_ops import _layout_like
from .dispatch import backend_names, select_backend
from .problem import A2DProblem, as_layers, make_problem, mixing_weight
from .reference import a2d_kl_reference

Heads = Union[torch.Tensor, Sequence[torch.Tensor]]
Scale = Union[None, float, Tuple[Optional[float], Optional[float]]]

QK_BACKENDS = backend_names("qk")

# A finite stand-in for -inf on invisible logits (as in ``reference``): a row with
# no visible key stays finite, so its zeroing never meets a NaN in autograd.
_INVISIBLE = -1e30


@dataclass(frozen=True)
class QKProblem:
    """Validated QK-mode inputs. Shapes: student ``q (B, Cs, T, Ds)``, ``k (B, Cs, K, Ds)``;
    teacher ``q (B, Ct, T, Dt)``, ``k (B, Ct, K, Dt)``; channels layer-major.

    ``maps`` is the equivalent map-mode problem with zero-stride stand-in maps: it
    carries the validated weight, bias, masks, mode and reduction (one place checks
    them, ``problem.make_problem``) and its ``reduction_denominator()``.
    """

    student_q: torch.Tensor
    student_k: torch.Tensor
    teacher_q: torch.Tensor
    teacher_k: torch.Tensor
    student_scale: float
    teacher_scale: float
    causal: bool
    maps: A2DProblem

    @property
    def device(self) -> torch.device:
        return self.student_q.device

    @property
    def weight(self) -> torch.Tensor:
        return self.maps.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.maps.bias

    @property
    def key_valid(self) -> Optional[torch.Tensor]:
        return self.maps.key_valid

    @property
    def query_valid(self) -> Optional[torch.Tensor]:
        return self.maps.query_valid

    @property
    def normalize(self) -> str:
        return self.maps.normalize

    @property
    def reduction(self) -> str:
        return self.maps.reduction

    def with_tensors(self, student_q, student_k, teacher_q, teacher_k, weight, bias) -> "QKProblem":
        """The same problem over other (e.g. autograd-unpacked) tensors."""
        maps = A2DProblem(
            student=self.maps.student, teacher=self.maps.teacher, weight=weight, bias=bias,
            key_valid=self.maps.key_valid, query_valid=self.maps.query_valid,
            normalize=self.maps.normalize, reduction=self.maps.reduction,
        )
        return QKProblem(student_q, student_k, teacher_q, teacher_k,
                         self.student_scale, self.teacher_scale, self.causal, maps)


# ----------------------------------------------------------------------------- checks

def _check_side(side: str, qs: Heads, ks: Heads, device) -> Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]:
    """Per-layer q (B, H, T, D) and k (B, H, K, D) of one side, checked against each other."""
    q_layers = as_layers(f"{side}_q", qs, "(B, H, T, D)", "(B, C, T, D)")
    k_layers = as_layers(f"{side}_k", ks, "(B, H, K, D)", "(B, C, K, D)")
    for name, given, layers in ((f"{side}_q", qs, q_layers), (f"{side}_k", ks, k_layers)):
        for i, t in enumerate(layers):
            if 0 in t.shape:
                where = name if isinstance(given, torch.Tensor) else f"{name}[{i}]"
                raise ValueError(f"{where} must be non-empty, got shape {tuple(t.shape)}")
    if len(q_layers) != len(k_layers):
        raise ValueError(f"{side}_q has {len(q_layers)} layers but {side}_k has {len(k_layers)}; "
                         "they need one (q, k) pair per layer")
    q0 = q_layers[0]
    B, _, T, D = q0.shape
    K = k_layers[0].shape[2]
    for i, (q, k) in enumerate(zip(q_layers, k_layers)):
        for name, t in ((f"{side}_q[{i}]", q), (f"{side}_k[{i}]", k)):
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but student_q[0] is on {device}; "
                                 "all inputs must be on one device")
            if t.dtype != q0.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but {side}_q[0] has {q0.dtype}; "
                                f"the {side} queries and keys must share one dtype")
        if q.shape[0] != B or q.shape[2] != T or q.shape[3] != D:
            raise ValueError(f"{side}_q[{i}] has shape {tuple(q.shape)} but {side}_q[0] has {tuple(q0.shape)}: "
                             f"every layer needs the same B={B}, T={T} and head dim D={D} (only H may differ)")
        if k.shape[0] != B or k.shape[1] != q.shape[1] or k.shape[2] != K or k.shape[3] != D:
            raise ValueError(f"{side}_k[{i}] has shape {tuple(k.shape)} but needs (B, H, K, D) = "
                             f"({B}, {q.shape[1]}, {K}, {D}) to match {side}_q[{i}] {tuple(q.shape)} "
                             f"and {side}_k[0] (K={K})")
    return q_layers, k_layers


def _scales(scale: Scale, d_student: int, d_teacher: int) -> Tuple[float, float]:
    if isinstance(scale, (tuple, list)):
        if len(scale) != 2:
            raise ValueError(f"scale must be None, a float, or a (student, teacher) pair, got {len(scale)} values")
        s, t = scale
    else:
        s = t = scale
    out = []
    for who, value, d in (("student", s, d_student), ("teacher", t, d_teacher)):
        if value is None:
            value = 1.0 / math.sqrt(d)
        if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"scale for the {who} must be a finite Python number or None "
                            f"(1/sqrt(head dim)), got {value!r}")
        out.append(float(value))
    return out[0], out[1]


def _stacked(layers: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    return layers[0] if len(layers) == 1 else torch.cat(layers, dim=1)


def make_qk_problem(student_q: Heads, student_k: Heads, teacher_q: Heads, teacher_k: Heads,
                    weight: torch.Tensor, bias: Optional[torch.Tensor], *, scale: Scale = None,
                    causal: bool = False, key_padding_mask: Optional[torch.Tensor] = None,
                    query_mask: Optional[torch.Tensor] = None, normalize: str = "map",
                    reduction: str = "sum") -> QKProblem:
    """Validate every QK-mode argument; raise naming the argument, or return the problem."""
    first = student_q[0] if isinstance(student_q, (list, tuple)) and student_q else student_q
    device = first.device if isinstance(first, torch.Tensor) else None
    sq, sk = _check_side("student", student_q, student_k, device)
    tq, tk = _check_side("teacher", teacher_q, teacher_k, device)
    B, _, T, Ds = sq[0].shape
    K = sk[0].shape[2]
    tB, _, tT, Dt = tq[0].shape
    tK = tk[0].shape[2]
    if (tB, tT, tK) != (B, T, K):
        raise ValueError(f"teacher_q/teacher_k give B={tB}, T={tT}, K={tK} but student_q/student_k give "
                         f"B={B}, T={T}, K={K}; both sides must attend over the same queries and keys")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and T != K:
        raise ValueError(f"causal=True needs as many queries as keys (self-attention), got T={T}, K={K}")
    student_scale, teacher_scale = _scales(scale, Ds, Dt)

    Cs = sum(q.shape[1] for q in sq)
    Ct = sum(q.shape[1] for q in tq)
    # Checked here for the QK wording (heads, not map channels); make_problem re-checks.
    mixing_weight(weight, Ct, Cs, f"{Ct} teacher heads and {Cs} student heads (summed over layers)")

    # Zero-stride stand-ins let the map-mode checks (weight, bias, masks, mode,
    # reduction) run unchanged; they allocate one element each.
    def stand_in(layers, dtype):
        return [torch.zeros((), dtype=dtype, device=device).expand(B, q.shape[1], T, K) for q in layers]

    maps = make_problem(stand_in(sq, sq[0].dtype), stand_in(tq, tq[0].dtype), weight, bias,
                        normalize=normalize, reduction=reduction,
                        key_padding_mask=key_padding_mask, query_mask=query_mask)
    return QKProblem(
        student_q=_stacked(sq), student_k=_stacked(sk),
        # The teacher is a constant: no gradient flows into it, whichever backend runs.
        teacher_q=_stacked(tq).detach(), teacher_k=_stacked(tk).detach(),
        student_scale=student_scale, teacher_scale=teacher_scale, causal=causal, maps=maps,
    )


# ------------------------------------------------------------------- reference path

def visible_keys(problem: QKProblem) -> Optional[torch.Tensor]:
    """(B, 1, T, K) bool: which keys each query attends to, or None for all."""
    B, T, K = problem.student_q.shape[0], problem.student_q.shape[2], problem.student_k.shape[2]
    device = problem.student_q.device
    if problem.key_valid is None and not problem.causal:
        return None
    visible = torch.ones(B, 1, T, K, dtype=torch.bool, device=device)
    if problem.key_valid is not None:
        visible = visible & problem.key_valid[:, None, None, :]
    if problem.causal:
        visible = visible & torch.ones(T, K, dtype=torch.bool, device=device).tril()
    return visible


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, visible: Optional[torch.Tensor],
                    dtype: torch.dtype) -> torch.Tensor:
    """softmax(scale * q k^T) over visible keys, (B, H, T, K); rows with none are zeros."""
    logits = torch.einsum("bhtd,bhkd->bhtk", q.to(dtype), k.to(dtype)) * scale
    if visible is None:
        return logits.softmax(-1)
    probs = torch.where(visible, logits, _INVISIBLE).softmax(-1)
    return torch.where(visible.any(-1, keepdim=True), probs, 0.0)


def a2d_kl_qk_reference(problem: QKProblem) -> torch.Tensor:
    """Materialize both sides' maps and hand them to the map-mode reference (the oracle).

    Autocast is off inside, as in ``reference.kl_per_map``: the scores are computed in
    fp32 (fp64) whatever autocast region the caller is in, like the fused kernels.
    """
    with torch.autocast(problem.student_q.device.type, enabled=False):
        return _a2d_kl_qk_reference(problem)


def _a2d_kl_qk_reference(problem: QKProblem) -> torch.Tensor:
    inputs = (problem.student_q, problem.student_k, problem.teacher_q, problem.teacher_k)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32
    visible = visible_keys(problem)
    student = attention_probs(problem.student_q, problem.student_k, problem.student_scale, visible, dtype)
    with torch.no_grad():
        teacher = attention_probs(problem.teacher_q, problem.teacher_k, problem.teacher_scale, visible, dtype)
    maps = A2DProblem(
        student=(student,), teacher=(teacher,), weight=problem.weight, bias=problem.bias,
        key_valid=problem.key_valid, query_valid=problem.query_valid,
        normalize=problem.normalize, reduction=problem.reduction,
    )
    return a2d_kl_reference(maps)


# --------------------------------------------------------------------------- autograd

class QKA2DKL(torch.autograd.Function):
    """Fused QK-mode loss: forward keeps O(B*C*T) statistics, backward recomputes tiles."""

    @staticmethod
    def forward(ctx, kernels, problem: QKProblem, student_q, student_k, teacher_q, teacher_k, weight, bias):
        problem = problem.with_tensors(student_q, student_k, teacher_q, teacher_k, weight, bias)
        kl, saved = kernels.forward(problem)
        ctx.save_for_backward(student_q, student_k, teacher_q, teacher_k, weight, bias, *saved)
        ctx.kernels, ctx.problem = kernels, problem.with_tensors(None, None, None, None, None, None)
        return problem.maps.reduce(kl)

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward()
        sq, sk, tq, tk, weight, bias, *saved = ctx.saved_tensors
        problem = ctx.problem.with_tensors(sq, sk, tq, tk, weight, bias)
        need_qk = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        dq, dk, dweight, dbias = ctx.kernels.backward(problem, tuple(saved), problem.maps.grad_scale(grad_loss),
                                                      need_qk)
        return None, None, dq, dk, None, None, dweight, dbias


# ----------------------------------------------------------------- torch.compile
# The kernels launch on raw pointers, which fails on the fake tensors torch.compile
# traces with, so compiled code reaches them through two opaque custom ops (the same
# design as ``a2d_kernels.custom_ops`` for the map path; eager mode keeps the cheaper
# ``QKA2DKL``). The ops take the stacked, already checked tensors.

def _repack(sq, sk, tq, tk, weight, bias, key_valid, query_valid, student_scale, teacher_scale,
            causal, normalize, reduction) -> QKProblem:
    B, Cs, T, _ = sq.shape
    K, Ct = sk.shape[2], tq.shape[1]
    stand_in = torch.zeros((), dtype=sq.dtype, device=sq.device)
    maps = A2DProblem(student=(stand_in.expand(B, Cs, T, K),), teacher=(stand_in.expand(B, Ct, T, K),),
                      weight=weight, bias=bias, key_valid=key_valid, query_valid=query_valid,
                      normalize=normalize, reduction=reduction)
    return QKProblem(sq, sk, tq, tk, student_scale, teacher_scale, causal, maps)


def _triton_kernels():
    from .ops.triton_qk import BACKEND
    return BACKEND


@torch.library.custom_op("a2d_kernels::a2d_kl_qk_fwd", mutates_args=())
def a2d_kl_qk_fwd(student_q: Tensor, student_k: Tensor, teacher_q: Tensor, teacher_k: Tensor, weight: Tensor,
                  bias: Optional[Tensor], key_valid: Optional[Tensor], query_valid: Optional[Tensor],
                  student_scale: float, teacher_scale: float, causal: bool, normalize: str,
                  reduction: str) -> Tuple[Tensor, List[Tensor]]:
    """(reduced loss, saved statistics) of the Triton QK kernels."""
    problem = _repack(student_q, student_k, teacher_q, teacher_k, weight, bias, key_valid, query_valid,
                      student_scale, teacher_scale, causal, normalize, reduction)
    kl, saved = _triton_kernels().forward(problem)
    return problem.maps.reduce(kl), [t.contiguous() for t in saved]


@a2d_kl_qk_fwd.register_fake
def _a2d_kl_qk_fwd_fake(student_q, student_k, teacher_q, teacher_k, weight, bias, key_valid, query_valid,
                        student_scale, teacher_scale, causal, normalize, reduction):
    B, Cs, T, _ = student_q.shape
    Ct = teacher_q.shape[1]

    def new(*shape):
        return student_q.new_empty(shape, dtype=torch.float32)

    # Exactly what triton_qk.forward saves: lse_s, lse_t, shifts.
    return new(), [new(B, Cs, T), new(B, Ct, T), new(3, B, Ct, T)]


@torch.library.custom_op("a2d_kernels::a2d_kl_qk_bwd", mutates_args=())
def a2d_kl_qk_bwd(grad_loss: Tensor, student_q: Tensor, student_k: Tensor, teacher_q: Tensor, teacher_k: Tensor,
                  weight: Tensor, bias: Optional[Tensor], key_valid: Optional[Tensor],
                  query_valid: Optional[Tensor], saved: List[Tensor], student_scale: float,
                  teacher_scale: float, causal: bool, normalize: str, reduction: str,
                  need_qk: bool) -> Tuple[List[Tensor], Tensor, List[Tensor]]:
    """([dQ, dK] or [], dweight, [dbias] or []) of the Triton QK kernels."""
    problem = _repack(student_q, student_k, teacher_q, teacher_k, weight, bias, key_valid, query_valid,
                      student_scale, teacher_scale, causal, normalize, reduction)
    dq, dk, dweight, dbias = _triton_kernels().backward(problem, tuple(saved), problem.maps.grad_scale(grad_loss),
                                                        need_qk)
    d_qk = [_layout_like(dq, student_q), _layout_like(dk, student_k)] if need_qk else []
    return d_qk, _layout_like(dweight, weight), [] if dbias is None else [_layout_like(dbias, bias)]


@a2d_kl_qk_bwd.register_fake
def _a2d_kl_qk_bwd_fake(grad_loss, student_q, student_k, teacher_q, teacher_k, weight, bias, key_valid,
                        query_valid, saved, student_scale, teacher_scale, causal, normalize, reduction, need_qk):
    d_qk = [torch.empty_like(student_q), torch.empty_like(student_k)] if need_qk else []
    return d_qk, torch.empty_like(weight), [] if bias is None else [torch.empty_like(bias)]


def _qk_setup_context(ctx, inputs, output):
    sq, sk, tq, tk, weight, bias, key_valid, query_valid, *meta = inputs
    _, saved = output
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(sq, sk, tq, tk, weight, bias, key_valid, query_valid, *saved)
    ctx.meta = tuple(meta)


def _qk_backward(ctx, grad_loss, _grad_saved):
    sq, sk, tq, tk, weight, bias, key_valid, query_valid, *saved = ctx.saved_tensors
    need_qk = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    d_qk, dweight, dbias = a2d_kl_qk_bwd(grad_loss, sq, sk, tq, tk, weight, bias, key_valid, query_valid,
                                         saved, *ctx.meta, need_qk)
    dq, dk = d_qk if need_qk else (None, None)
    return (dq, dk, None, None, dweight, dbias[0] if dbias else None, None, None, None, None, None, None, None)


a2d_kl_qk_fwd.register_autograd(_qk_backward, setup_context=_qk_setup_context)


def _fused(kernels, problem: QKProblem) -> torch.Tensor:
    """Eager: the autograd Function (least Python overhead); compiled: the custom ops."""
    if torch.compiler.is_compiling():
        loss, _ = a2d_kl_qk_fwd(problem.student_q, problem.student_k, problem.teacher_q, problem.teacher_k,
                                problem.weight, problem.bias, problem.key_valid, problem.query_valid,
                                problem.student_scale, problem.teacher_scale, problem.causal,
                                problem.normalize, problem.reduction)
        return loss
    return QKA2DKL.apply(kernels, problem, problem.student_q, problem.student_k,
                         problem.teacher_q, problem.teacher_k, problem.weight, problem.bias)


def a2d_kl_qk(
    student_q: Heads,
    student_k: Heads,
    teacher_q: Heads,
    teacher_k: Heads,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    scale: Scale = None,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_mask: Optional[torch.Tensor] = None,
    normalize: str = "map",
    reduction: str = "sum",
    backend: str = "auto",
) -> torch.Tensor:
    """The A2D loss from queries and keys: ``a2d_kl`` of the attention maps they define.

    Args:
        student_q: per-layer ``(B, H_l, T, Ds)`` queries (list/tuple) or one stacked
            ``(B, Cs, T, Ds)`` tensor, the exact tensors the attention layer feeds to
            ``scaled_dot_product_attention`` (before the softmax scale). Layer-major channels.
        student_k: per-layer ``(B, H_l, K, Ds)`` keys, matching ``student_q``.
        teacher_q, teacher_k: the same for the teacher (head dim ``Dt`` may differ
            from ``Ds``); never differentiated.
        weight: ``(Ct, Cs)`` mixing matrix (a ``Conv2d(Cs, Ct, 1).weight`` also works).
        bias: ``(Ct,)`` or None.
        scale: softmax scale: None (``1/sqrt(head dim)`` per side, SDPA's default), one
            float for both sides, or a ``(student, teacher)`` pair.
        causal: each query sees only keys ``k <= t`` (needs ``T == K``). Entries above
            the diagonal are zero-probability map entries, not excluded from the loss.
        key_padding_mask: ``(B, K)`` bool, True = padded key: it gets no attention and
            is excluded from the loss.
        query_mask: ``(B, T)`` bool, True = padded query: excluded from the loss.
        normalize, reduction: as in :func:`a2d_kernels.a2d_kl`.
        backend: ``"auto"`` (Triton on CUDA, else the reference), ``"reference"``
            (materializes the maps), or ``"triton"``.

    A query row with no visible key has an all-zero map row (see the module docstring).

    Returns:
        0-dim loss, fp32 (fp64 when the inputs are fp64).
    """
    problem = make_qk_problem(student_q, student_k, teacher_q, teacher_k, weight, bias, scale=scale,
                              causal=causal, key_padding_mask=key_padding_mask, query_mask=query_mask,
                              normalize=normalize, reduction=reduction)
    kernels = select_backend(backend, problem, family="qk")
    if kernels is None:
        return a2d_kl_qk_reference(problem)
    return _fused(kernels, problem)
