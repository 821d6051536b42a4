"""The A2D release's training criterion (DESIGN.md section 1, "training objective").

    total = (1 - alpha) * label_smoothed_CE + alpha * word_KD + A2D attention term

* ``label_smoothed_CE``: fairseq's label-smoothed cross entropy, a mean over the
  batch's non-pad target tokens.
* ``word_KD``: KL(teacher || student) between the token distributions, the same
  mean. (Its gradient equals that of the soft cross entropy the release uses; KL is
  reported because it reads 0 when the student matches the teacher.)
* the attention term: ``A2DDistiller`` output, already weighted by
  ``beta * decay**(epoch - 1)`` and 1/2 per decoder kind; a sum, skipped in validation.

QK mode (``a2d_qk``): the attention term comes from the layers' queries and keys
(``A2DDistiller.forward_qk``, the models running ``attn_impl="sdpa"``) instead of their
maps; same mixers, same value. It always uses the padding masks (``a2d_mask`` must be
on): QK mode's padding mask both hides padded keys from the softmax and drops them
from the loss, which only the masked map-mode loss matches exactly. The release's
unmasked loss keeps padded keys as ordinary (zero-probability) entries of every map,
which the mixer still mixes and the KL still counts; QK mode cannot express that, so
it refuses rather than compute something else. On a batch without padding the two
losses are equal.

Kinds of run (``kd``): ``"none"`` (CE only: the plain baseline student or a teacher),
``"word"`` (CE + word-KD) and ``"a2d"`` (CE + word-KD + attention term).

Normalization across devices and accumulation steps: every term is computed as a sum
and divided by a ``denominator`` the caller passes (the non-pad token count of the
whole optimizer update, over all ranks and micro-batches), so gradients of an update
do not depend on how its sentences were split into micro-batches or processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from a2d_kernels.distill import A2DDistiller

KD_MODES = ("none", "word", "a2d")


@dataclass
class ObjectiveOutput:
    """``loss``: what backward sees; ``parts``: detached sums for logging
    (``ce``, ``nll``, ``kd``, ``attn``, plus ``attn_<kind>`` unweighted)."""

    loss: torch.Tensor
    parts: Dict[str, torch.Tensor]


def label_smoothed_nll_sum(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                           epsilon: float) -> tuple:
    """fairseq's label-smoothed NLL, summed over valid tokens: returns ``(loss, nll)``.

    ``loss = (1 - eps - eps_i) * nll + eps_i * sum_v(-log p_v)`` with ``eps_i = eps/(V-1)``,
    i.e. the target keeps ``1 - eps`` of the mass and every other token gets ``eps_i``.
    """
    lprobs = torch.log_softmax(logits.float(), dim=-1)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.sum(-1)
    eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth
    return loss[valid].sum(), nll[valid].sum()


def word_kd_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """sum over valid tokens of KL(teacher || student), in fp32."""
    student_lp = torch.log_softmax(student_logits.float(), dim=-1)[valid]
    teacher_lp = torch.log_softmax(teacher_logits.float(), dim=-1)[valid]
    return F.kl_div(student_lp, teacher_lp, reduction="sum", log_target=True)


class DistillationObjective(nn.Module):
    """The criterion; holds the A2D mixers (train them with the student).

    Args:
        kd: ``"none"``, ``"word"`` or ``"a2d"``.
        alpha: word-KD weight (CE gets ``1 - alpha``); unused when ``kd == "none"``.
        label_smoothing: epsilon of the CE.
        distiller: the ``A2DDistiller`` (required for ``kd == "a2d"``, else None).
        a2d_mask: pass the padding masks to the distiller (the release masks nothing).
        a2d_qk: QK mode: ``student_attn`` / ``teacher_attn`` are the models' ``need_qk``
            records and the term is ``distiller.forward_qk`` (needs ``kd="a2d"`` and ``a2d_mask``).
    """

    def __init__(self, kd: str = "none", alpha: float = 0.5, label_smoothing: float = 0.1,
                 distiller: Optional[A2DDistiller] = None, a2d_mask: bool = False, a2d_qk: bool = False) -> None:
        super().__init__()
        if kd not in KD_MODES:
            raise ValueError(f"kd must be one of {KD_MODES}, got {kd!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if (kd == "a2d") != (distiller is not None):
            raise ValueError(f"kd={kd!r} {'needs' if kd == 'a2d' else 'takes no'} distiller")
        if a2d_qk and kd != "a2d":
            raise ValueError(f"a2d_qk (QK mode) computes the A2D attention term; it needs kd='a2d', got kd={kd!r}")
        if a2d_qk and not a2d_mask:
            raise ValueError("a2d_qk (QK mode) computes the padding-masked A2D loss; it needs a2d_mask=True "
                             "(the unmasked loss keeps padded keys, which QK mode cannot)")
        self.kd = kd
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.distiller = distiller
        self.a2d_mask = a2d_mask
        self.a2d_qk = a2d_qk

    @property
    def needs_attention(self) -> bool:
        return self.kd == "a2d"

    @property
    def attention_impl(self) -> str:
        """The ``attn_impl`` the models run: ``"sdpa"`` in QK mode, else ``"maps"``."""
        return "sdpa" if self.a2d_qk else "maps"

    def attention_request(self, training: bool = True) -> dict:
        """The model keywords that return what this objective's attention term takes:
        ``need_attn`` (maps) or ``need_qk`` (QK mode), or neither."""
        need = self.needs_attention and training
        return {"need_attn": need and not self.a2d_qk, "need_qk": need and self.a2d_qk}

    def forward(self, student_logits: torch.Tensor, target: torch.Tensor, tgt_padding_mask: torch.Tensor,
                denominator: float, src_padding_mask: Optional[torch.Tensor] = None,
                student_attn=None, teacher_logits: Optional[torch.Tensor] = None, teacher_attn=None,
                epoch: Optional[int] = None) -> ObjectiveOutput:
        """``denominator``: token count the CE and word-KD sums are divided by.
        ``epoch`` (1-based) None means validation: no attention term."""
        valid = ~tgt_padding_mask
        ce, nll = label_smoothed_nll_sum(student_logits, target, valid, self.label_smoothing)
        parts = {"ce": ce.detach(), "nll": nll.detach()}
        if self.kd == "none":
            loss = ce / denominator
        else:
            if teacher_logits is None:
                raise ValueError(f"kd={self.kd!r} needs teacher_logits")
            kd = word_kd_sum(student_logits, teacher_logits, valid)
            parts["kd"] = kd.detach()
            loss = ((1.0 - self.alpha) * ce + self.alpha * kd) / denominator
        if self.kd == "a2d" and epoch is not None:
            if student_attn is None or teacher_attn is None:
                raise ValueError("kd='a2d' needs student_attn and teacher_attn in training "
                                 f"(the models' {'need_qk' if self.a2d_qk else 'need_attn'} records)")
            masks = {}
            if self.a2d_mask:
                masks = {"src_padding_mask": src_padding_mask, "tgt_padding_mask": tgt_padding_mask}
            term = self.distiller.forward_qk if self.a2d_qk else self.distiller
            out = term(student_attn, teacher_attn, epoch=epoch, **masks)
            loss = loss + out.total
            parts["attn"] = out.total.detach()
            parts.update({f"attn_{k}": v.detach() for k, v in out.parts.items()})
        return ObjectiveOutput(loss=loss, parts=parts)
