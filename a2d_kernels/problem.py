"""Argument checking for the A2D loss: done once, before any backend runs.

Every public entry point (``a2d_kl``, ``A2DLoss``) funnels its arguments through
:func:`make_problem`, which either raises an error naming the argument, what it got
and what it needs, or returns an :class:`A2DProblem` whose fields every backend can
trust without re-checking. Nothing here synchronizes with the device: only shapes,
dtypes and devices are inspected, never values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

NORMALIZE_MODES = ("map", "row")
REDUCTIONS = ("sum", "mean", "batchmean")
BACKEND_NAMES = ("auto", "reference", "triton", "cuda")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Maps = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass(frozen=True)
class A2DProblem:
    """Validated inputs of one A2D loss evaluation.

    ``student``/``teacher`` are per-layer ``(B, H_l, T, K)`` tensors (a stacked
    ``(B, C, T, K)`` input is a one-layer tuple); channel ``c`` of the concatenation
    is layer-major, exactly as DESIGN.md section 1 defines. ``key_valid`` /
    ``query_valid`` are the *negations* of the user's padding masks (True = position
    takes part), or None when there is no mask, so kernels never re-derive them.
    """

    student: Tuple[torch.Tensor, ...]
    teacher: Tuple[torch.Tensor, ...]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    key_valid: Optional[torch.Tensor]
    query_valid: Optional[torch.Tensor]
    normalize: str
    reduction: str

    @property
    def batch(self) -> int:
        return self.student[0].shape[0]

    @property
    def queries(self) -> int:
        return self.student[0].shape[2]

    @property
    def keys(self) -> int:
        return self.student[0].shape[3]

    @property
    def student_heads(self) -> Tuple[int, ...]:
        return tuple(s.shape[1] for s in self.student)

    @property
    def teacher_heads(self) -> Tuple[int, ...]:
        return tuple(a.shape[1] for a in self.teacher)

    @property
    def student_channels(self) -> int:
        return sum(self.student_heads)

    @property
    def teacher_channels(self) -> int:
        return sum(self.teacher_heads)

    @property
    def device(self) -> torch.device:
        return self.student[0].device

    def reduction_denominator(self) -> Union[int, torch.Tensor]:
        """What the summed KL is divided by for this problem's reduction.

        A tensor (never a Python number read back from the device) when it depends on
        the query mask, so no host synchronization happens in the loss path.
        """
        if self.reduction == "sum":
            return 1
        if self.reduction == "batchmean":
            return self.batch
        # "mean": number of KL terms.
        if self.normalize == "map":
            return self.batch * self.teacher_channels
        if self.query_valid is None:
            return self.batch * self.queries * self.teacher_channels
        rows = self.query_valid.sum(dtype=torch.float32) * self.teacher_channels
        return rows.clamp_min(1.0)

    def reduce(self, kl: torch.Tensor) -> torch.Tensor:
        """The 0-dim loss from the (B, Ct) summed KL per map: the one place the
        reduction is applied, for every backend and mode."""
        return kl.sum() / self.reduction_denominator()

    def grad_scale(self, grad_loss: torch.Tensor) -> torch.Tensor:
        """d loss / d (every KL term): the upstream gradient over the denominator, as
        the 0-dim fp32 device tensor the kernels read (never ``.item()``)."""
        return (grad_loss.to(torch.float32) / self.reduction_denominator()).reshape(())


def as_layers(name: str, value, layer_shape: str = "(B, H, T, K)",
              stacked_shape: str = "(B, C, T, K)") -> Tuple[torch.Tensor, ...]:
    """``value`` (one stacked tensor or a list/tuple of per-layer tensors) as a tuple of
    4-D floating tensors of one dtype with at least one head each; raises naming
    ``name`` (and the layer), what it got and what it needs. Shared by the map and the
    QK entry points, which pass their own layout names."""
    if isinstance(value, torch.Tensor):
        layers: Tuple = (value,)
    elif isinstance(value, (list, tuple)):
        layers = tuple(value)
        if not layers:
            raise ValueError(f"{name} is an empty {type(value).__name__}; it needs at least one {layer_shape} tensor")
    else:
        raise TypeError(f"{name} must be a tensor {stacked_shape} or a list/tuple of per-layer {layer_shape} "
                        f"tensors, got {type(value).__name__}")
    for i, t in enumerate(layers):
        where = name if isinstance(value, torch.Tensor) else f"{name}[{i}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{where} must be 4-D {layer_shape}, got {t.dim()}-D with shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where} must be a floating tensor (float16, bfloat16, float32 or float64), "
                            f"got {t.dtype}")
        if t.shape[1] == 0:
            raise ValueError(f"{where} has 0 heads (shape {tuple(t.shape)}); every layer needs H >= 1")
        if t.dtype != layers[0].dtype:
            raise TypeError(f"{name} layers must share one dtype: layer 0 is {layers[0].dtype}, "
                            f"layer {i} is {t.dtype}; cast them to one dtype")
    return layers


def mixing_weight(weight, Ct: int, Cs: int, counted: str) -> torch.Tensor:
    """``weight`` as the (Ct, Cs) mixing matrix (a ``Conv2d(Cs, Ct, 1).weight`` is
    flattened); raises naming ``weight`` and its shape as given. ``counted`` says where
    Ct and Cs come from, for the message."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor of shape (Ct, Cs) = ({Ct}, {Cs}), got {type(weight).__name__}")
    given = tuple(weight.shape)
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        weight = weight.flatten(1)  # accept a Conv2d(Cs, Ct, 1).weight as is
    if tuple(weight.shape) != (Ct, Cs):
        raise ValueError(f"weight must have shape (Ct, Cs) = ({Ct}, {Cs}) (or ({Ct}, {Cs}, 1, 1)) for {counted}, "
                         f"got {given}")
    return weight


def _check_mask(
    name: str, mask: Optional[torch.Tensor], shape: Tuple[int, int], what: str, device
) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor {shape} or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor (True = padding, excluded) of shape {shape}, "
            f"got dtype {mask.dtype}. A Hugging Face attention_mask (1 = keep) becomes "
            f"{name}=attention_mask == 0"
        )
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (B, {what}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the attention maps are on {device}")
    return ~mask


def make_problem(
    student_maps: Maps,
    teacher_maps: Maps,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    normalize: str = "map",
    reduction: str = "sum",
    key_padding_mask: Optional[torch.Tensor] = None,
    query_mask: Optional[torch.Tensor] = None,
) -> A2DProblem:
    """Validate every argument of the A2D loss and return the trusted problem."""
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")

    student = as_layers("student_maps", student_maps)
    teacher = as_layers("teacher_maps", teacher_maps)

    ref = student[0]
    device = ref.device
    B, _, T, K = ref.shape
    for name, layers in (("student_maps", student), ("teacher_maps", teacher)):
        for i, t in enumerate(layers):
            if t.device != device:
                raise ValueError(
                    f"{name}[{i}] is on {t.device} but student_maps[0] is on {device}; "
                    "all inputs must be on one device"
                )
            if (t.shape[0], t.shape[2], t.shape[3]) != (B, T, K):
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(t.shape)} but student_maps[0] has "
                    f"{tuple(ref.shape)}: every layer needs the same B={B}, T={T}, K={K} "
                    "(only the head count may differ)"
                )
    if B == 0 or T == 0 or K == 0:
        raise ValueError(f"attention maps must be non-empty, got B={B}, T={T}, K={K}")

    Cs = sum(s.shape[1] for s in student)
    Ct = sum(a.shape[1] for a in teacher)
    weight = mixing_weight(weight, Ct, Cs, f"teacher_maps with {Ct} channels and student_maps with {Cs} channels")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but the attention maps are on {device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a tensor of shape ({Ct},) or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (Ct,):
            raise ValueError(f"bias must have shape (Ct,) = ({Ct},), got {tuple(bias.shape)}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but the attention maps are on {device}")

    key_valid = _check_mask("key_padding_mask", key_padding_mask, (B, K), "K", device)
    query_valid = _check_mask("query_mask", query_mask, (B, T), "T", device)

    # The teacher is a constant: no gradient flows into it, whichever backend runs.
    teacher = tuple(a.detach() for a in teacher)
    return A2DProblem(
        student=student,
        teacher=teacher,
        weight=weight,
        bias=bias,
        key_valid=key_valid,
        query_valid=query_valid,
        normalize=normalize,
        reduction=reduction,
    )
