"""``A2DLoss``: the Attention Alignment Module and its loss as one ``nn.Module``."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .functional import a2d_kl
from .problem import BACKEND_NAMES, NORMALIZE_MODES, REDUCTIONS, Maps

Channels = Union[int, Sequence[int]]


def _channel_count(name: str, channels: Channels) -> int:
    """An int, or per-layer head counts (summed): both spell the channel count."""
    if isinstance(channels, bool):
        raise TypeError(f"{name} must be an int or a sequence of per-layer head counts, got bool")
    if isinstance(channels, int):
        counts = [channels]
    elif isinstance(channels, (list, tuple)) and channels and all(
        isinstance(c, int) and not isinstance(c, bool) for c in channels
    ):
        counts = list(channels)
    else:
        raise TypeError(
            f"{name} must be a positive int or a non-empty sequence of per-layer head "
            f"counts, got {channels!r}"
        )
    if any(c <= 0 for c in counts):
        raise ValueError(f"{name} must be positive, got {channels!r}")
    return sum(counts)


class A2DLoss(nn.Module):
    """Align-to-Distill attention loss with its trainable 1x1-conv head mixer.

    ``weight (Ct, Cs)`` and ``bias (Ct,)`` are initialized exactly as
    ``torch.nn.Conv2d(Cs, Ct, 1)`` would under the same RNG state, so a run seeded like
    the authors' code starts from the same mixer. Add the module's parameters to the
    student's optimizer: the mixer is trained with the student.

    Example::

        loss_fn = A2DLoss(student_channels=[4, 4, 4], teacher_channels=[4] * 6)
        loss = loss_fn(student_out.encoder_attentions, teacher_out.encoder_attentions)
    """

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        normalize: str = "map",
        reduction: str = "sum",
        backend: str = "auto",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        self.student_channels = _channel_count("student_channels", student_channels)
        self.teacher_channels = _channel_count("teacher_channels", teacher_channels)
        self.normalize = normalize
        self.reduction = reduction
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.teacher_channels, self.student_channels, **factory))
        self.bias = nn.Parameter(torch.empty(self.teacher_channels, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Conv2d's own init, in its RNG order: kaiming_uniform_(a=sqrt(5)) on the
        # (Ct, Cs, 1, 1) weight (fan_in = Cs, same draws as on (Ct, Cs)), then the bias
        # uniform in +-1/sqrt(fan_in).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.student_channels)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self,
        student_maps: Maps,
        teacher_maps: Maps,
        key_padding_mask: Optional[torch.Tensor] = None,
        query_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return a2d_kl(
            student_maps, teacher_maps, self.weight, self.bias,
            normalize=self.normalize, reduction=self.reduction,
            key_padding_mask=key_padding_mask, query_mask=query_mask,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
                f"normalize={self.normalize!r}, reduction={self.reduction!r}, backend={self.backend!r}")
