"""``A2DDistiller``: the release's whole attention term for an encoder-decoder.

One :class:`~a2d_kernels.A2DLoss` per attention kind (encoder self-attention,
decoder self-attention, decoder cross-attention), combined as the authors' criterion
does::

    L_attn = beta * decay**(epoch - 1) * (L_enc + L_dec)
    L_dec  = (L_dec_self + L_dec_cross) / 2   when both decoder kinds are on

Works with any model that returns per-layer ``(B, H, T, K)`` probability maps: the
trainer in ``python/a2d_trainer`` and Hugging Face seq2seq models alike.
:meth:`A2DDistiller.forward_qk` computes the same term from each layer's queries and
keys (QK mode, :func:`~a2d_kernels.a2d_kl_qk`), for models running fused attention;
the mixers are the same parameters in both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .module import A2DLoss
from .qk import QK_BACKENDS, a2d_kl_qk

ATTENTION_KINDS = ("encoder", "decoder_self", "decoder_cross")

# Which padding mask (source or target) marks each kind's queries and keys.
_QUERY_SIDE = {"encoder": "src", "decoder_self": "tgt", "decoder_cross": "tgt"}
_KEY_SIDE = {"encoder": "src", "decoder_self": "tgt", "decoder_cross": "src"}
# In an encoder-decoder only the decoder's self-attention is causal.
_CAUSAL = {"encoder": False, "decoder_self": True, "decoder_cross": False}


@dataclass
class A2DOutput:
    """``total`` is the weighted attention loss; ``parts`` the unweighted loss per kind."""

    total: torch.Tensor
    parts: Dict[str, torch.Tensor]


class A2DDistiller(nn.Module):
    """All A2D attention losses of a student/teacher encoder-decoder pair.

    Args:
        student_heads / teacher_heads: per kind, the head count of every layer, e.g.
            ``{"encoder": [4, 4, 4], "decoder_self": [4, 4, 4], "decoder_cross": [4, 4, 4]}``.
        kinds: which attentions are distilled (the encoder's is always part of the
            release's objective; the decoder kinds are flags there).
        beta, decay: the attention term's weight and its per-epoch decay.
        normalize, reduction, backend: passed to every :class:`A2DLoss`.
    """

    def __init__(
        self,
        student_heads: Mapping[str, Sequence[int]],
        teacher_heads: Mapping[str, Sequence[int]],
        kinds: Sequence[str] = ATTENTION_KINDS,
        beta: float = 1.0,
        decay: float = 0.9,
        normalize: str = "map",
        reduction: str = "sum",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        kinds = tuple(kinds)
        if not kinds:
            raise ValueError(f"kinds must name at least one of {ATTENTION_KINDS}, got none")
        for kind in kinds:
            if kind not in ATTENTION_KINDS:
                raise ValueError(f"kinds: unknown attention kind {kind!r}; expected some of {ATTENTION_KINDS}")
            for name, heads in (("student_heads", student_heads), ("teacher_heads", teacher_heads)):
                if kind not in heads:
                    raise ValueError(f"{name} has no entry for {kind!r} (it has {sorted(heads)})")
        self.kinds = kinds
        self.beta = float(beta)
        self.decay = float(decay)
        self.losses = nn.ModuleDict({
            kind: A2DLoss(list(student_heads[kind]), list(teacher_heads[kind]),
                          normalize=normalize, reduction=reduction, backend=backend)
            for kind in kinds
        })

    def weight_at(self, epoch: int) -> float:
        """``beta * decay**(epoch - 1)``: the attention term's weight in that (1-based) epoch."""
        return self.beta * self.decay ** (epoch - 1)

    def forward(
        self,
        student_attn: Mapping[str, Sequence[torch.Tensor]],
        teacher_attn: Mapping[str, Sequence[torch.Tensor]],
        epoch: int = 1,
        src_padding_mask: Optional[torch.Tensor] = None,
        tgt_padding_mask: Optional[torch.Tensor] = None,
    ) -> A2DOutput:
        """Combine every kind's loss.

        ``student_attn[kind]`` / ``teacher_attn[kind]``: the per-layer maps of that kind.
        ``src_padding_mask (B, S)`` / ``tgt_padding_mask (B, T)``: bool, True = padding;
        None masks nothing (as the release does).
        """
        side_masks = {"src": src_padding_mask, "tgt": tgt_padding_mask}
        parts = {}
        for kind in self.kinds:
            for name, attn in (("student_attn", student_attn), ("teacher_attn", teacher_attn)):
                if kind not in attn or attn[kind] is None:
                    raise ValueError(f"{name} has no {kind!r} maps; this distiller distills {self.kinds}")
            parts[kind] = self.losses[kind](
                student_attn[kind], teacher_attn[kind],
                key_padding_mask=side_masks[_KEY_SIDE[kind]],
                query_mask=side_masks[_QUERY_SIDE[kind]],
            )
        return self._combine(parts, epoch)

    def forward_qk(
        self,
        student_qk: Mapping[str, Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
        teacher_qk: Mapping[str, Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
        epoch: int = 1,
        src_padding_mask: Optional[torch.Tensor] = None,
        tgt_padding_mask: Optional[torch.Tensor] = None,
        scale=None,
    ) -> A2DOutput:
        """The same term in QK mode: no attention map is ever handed over.

        ``student_qk[kind]`` / ``teacher_qk[kind]``: a pair ``(queries, keys)`` of
        per-layer lists, ``(B, H, T, d)`` and ``(B, H, K, d)``, unscaled (see
        :func:`~a2d_kernels.a2d_kl_qk`; ``scale`` is passed to it, None = ``1/sqrt(d)``).
        ``decoder_self`` is taken as causal, the other kinds are not.

        Each kind's loss is ``a2d_kl_qk`` with that kind's :class:`A2DLoss` weight,
        bias, normalization, reduction and backend. It equals :meth:`forward` on the
        maps ``softmax(scale * q k^T)`` (masked) **with the same padding masks passed
        to both**: here a padding mask both hides the padded keys from the softmax and
        removes them (and padded queries) from the loss, so the padding masks cannot be
        left out as :meth:`forward` allows while the model itself masks padding. On a
        batch without padding, passing the masks or not gives the same loss.
        """
        side_masks = {"src": src_padding_mask, "tgt": tgt_padding_mask}
        parts = {}
        for kind in self.kinds:
            loss = self.losses[kind]
            if loss.backend not in QK_BACKENDS:
                raise ValueError(f"forward_qk: backend {loss.backend!r} has no QK mode; build the distiller "
                                 f"with one of {QK_BACKENDS}")
            (sq, sk), (tq, tk) = (_qk_pair(name, qk, kind, self.kinds)
                                  for name, qk in (("student_qk", student_qk), ("teacher_qk", teacher_qk)))
            parts[kind] = a2d_kl_qk(
                sq, sk, tq, tk, loss.weight, loss.bias, scale=scale, causal=_CAUSAL[kind],
                key_padding_mask=side_masks[_KEY_SIDE[kind]], query_mask=side_masks[_QUERY_SIDE[kind]],
                normalize=loss.normalize, reduction=loss.reduction, backend=loss.backend,
            )
        return self._combine(parts, epoch)

    def _combine(self, parts: Dict[str, torch.Tensor], epoch: int) -> A2DOutput:
        decoder = [parts[k] for k in ("decoder_self", "decoder_cross") if k in parts]
        combined = parts["encoder"] if "encoder" in parts else 0.0
        if decoder:
            combined = combined + sum(decoder) / len(decoder)
        return A2DOutput(total=self.weight_at(epoch) * combined, parts=parts)

    @classmethod
    def from_hf_configs(cls, student_config, teacher_config, kinds: Sequence[str] = ATTENTION_KINDS,
                        **kwargs) -> "A2DDistiller":
        """Build from two Hugging Face encoder-decoder configs (Marian, BART, T5, ...)."""
        return cls(_hf_heads(student_config), _hf_heads(teacher_config), kinds=kinds, **kwargs)

    def forward_hf(self, student_outputs, teacher_outputs, epoch: int = 1,
                   attention_mask: Optional[torch.Tensor] = None,
                   decoder_attention_mask: Optional[torch.Tensor] = None) -> A2DOutput:
        """Take Hugging Face seq2seq outputs and the batch's ``attention_mask`` /
        ``decoder_attention_mask`` (1 = keep, HF's convention; None masks nothing).

        Both models must be called with ``output_attentions=True`` and built with
        ``attn_implementation="eager"``: SDPA and flash attention return no maps.
        See ``examples/README.md`` for the whole training step.
        """

        return self(
            _hf_maps("student_outputs", student_outputs, self.kinds),
            _hf_maps("teacher_outputs", teacher_outputs, self.kinds), epoch=epoch,
            src_padding_mask=None if attention_mask is None else attention_mask == 0,
            tgt_padding_mask=None if decoder_attention_mask is None else decoder_attention_mask == 0,
        )


def _qk_pair(name: str, qk, kind: str, kinds: Sequence[str]):
    """``qk[kind]`` as a ``(queries, keys)`` pair, or a clear error."""
    if not isinstance(qk, Mapping):
        raise TypeError(f"{name} must map attention kinds to (queries, keys) pairs, got {type(qk).__name__}")
    entry = qk.get(kind)
    if entry is None:
        raise ValueError(f"{name} has no {kind!r} queries and keys; this distiller distills {tuple(kinds)}")
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
        length = f" of length {len(entry)}" if hasattr(entry, "__len__") else ""
        raise ValueError(f"{name}[{kind!r}] must be a pair (per-layer queries, per-layer keys), "
                         f"got {type(entry).__name__}{length}")
    return entry


# Where a Hugging Face seq2seq output (Seq2SeqLMOutput, Seq2SeqModelOutput) keeps each kind.
_HF_FIELDS = {"encoder": "encoder_attentions", "decoder_self": "decoder_attentions",
              "decoder_cross": "cross_attentions"}


def _hf_maps(name: str, outputs, kinds: Sequence[str]) -> Dict[str, Sequence[torch.Tensor]]:
    """The per-layer maps of ``kinds`` from a Hugging Face output, or a clear error.

    Models running SDPA or flash attention return no maps at all (``None``, or an empty
    tuple in recent ``transformers``), which would otherwise surface as a confusing
    shape error deep inside the loss.
    """
    maps = {}
    for kind in kinds:
        field = _HF_FIELDS[kind]
        if not hasattr(outputs, field):
            raise TypeError(
                f"{name} has no {field!r}: pass the model's output object (a ModelOutput such as "
                f"Seq2SeqLMOutput, not return_dict=False tuples), got {type(outputs).__name__}"
            )
        layers = getattr(outputs, field)
        if not layers:
            raise ValueError(
                f"{name}.{field} is {layers!r}: call the model with output_attentions=True, and "
                "load it with attn_implementation=\"eager\" (SDPA and flash attention return "
                "no attention maps)"
            )
        maps[kind] = layers
    return maps


def _hf_heads(config) -> Dict[str, list]:
    """Per-kind head counts from a Hugging Face config, across naming conventions."""

    def first(*names):
        for name in names:
            value = getattr(config, name, None)
            if value is not None:
                return value
        raise ValueError(f"config {type(config).__name__} has none of the attributes {names}")

    enc_layers = first("encoder_layers", "num_layers")
    dec_layers = first("decoder_layers", "num_decoder_layers", "num_layers")
    enc_heads = first("encoder_attention_heads", "num_heads")
    dec_heads = first("decoder_attention_heads", "num_heads")
    return {"encoder": [enc_heads] * enc_layers, "decoder_self": [dec_heads] * dec_layers,
            "decoder_cross": [dec_heads] * dec_layers}
