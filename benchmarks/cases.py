"""What the A2D benchmarks measure: shapes, inputs, phases and the byte floor.

Shapes follow the issue: IWSLT-like, WMT-like, a long-sequence case, and a sweep of
T = K at a fixed number of tokens per batch (B * T). With 4096 tokens per batch the
sweep passes through the IWSLT-like (T=64, B=64) and long (T=2048, B=2) shapes, so
those two are sweep points rather than separate runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

PHASES = ("forward", "backward", "forward+backward")
MODES = ("map", "row")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    """One benchmark shape. ``heads`` per layer splits Cs and Ct into per-layer tensors,
    the way a model hands them over (Hugging Face ``output_attentions``, fairseq)."""

    name: str
    B: int
    T: int
    K: int
    Cs: int
    Ct: int
    heads: int = 4

    def __post_init__(self):
        for field in ("B", "T", "K", "Cs", "Ct", "heads"):
            if getattr(self, field) <= 0:
                raise ValueError(f"Shape.{field} must be positive, got {getattr(self, field)}")
        if self.Cs % self.heads or self.Ct % self.heads:
            raise ValueError(
                f"Shape {self.name}: Cs={self.Cs} and Ct={self.Ct} must be multiples of "
                f"heads={self.heads} (channels are whole layers)"
            )

    @property
    def elements(self) -> int:
        """N of DESIGN.md section 2: entries of one (B, T, K) attention channel."""
        return self.B * self.T * self.K

    def to_dict(self) -> dict:
        return dict(name=self.name, B=self.B, T=self.T, K=self.K, Cs=self.Cs, Ct=self.Ct,
                    heads=self.heads)


IWSLT = Shape("iwslt", B=64, T=64, K=64, Cs=12, Ct=24)
WMT = Shape("wmt", B=32, T=128, K=128, Cs=48, Ct=96, heads=8)
LONG = Shape("long", B=2, T=2048, K=2048, Cs=12, Ct=24)
REALISTIC = (IWSLT, WMT, LONG)


def sweep(tokens: int = 4096, t_min: int = 64, t_max: int = 4096, Cs: int = 12, Ct: int = 24) -> List[Shape]:
    """T = K from ``t_min`` to ``t_max`` (powers of two) with B * T = ``tokens``.

    IWSLT-like and long shapes keep their names when the sweep hits them, so results
    are never duplicated.
    """
    named = {(s.B, s.T, s.K, s.Cs, s.Ct): s.name for s in REALISTIC}
    shapes = []
    T = t_min
    while T <= t_max:
        B = max(1, tokens // T)
        name = named.get((B, T, T, Cs, Ct), f"sweep-T{T}")
        shapes.append(Shape(name, B=B, T=T, K=T, Cs=Cs, Ct=Ct))
        T *= 2
    return shapes


def full_plan(tokens: int = 4096, t_max: int = 4096) -> List[Shape]:
    """The GPU plan, most important first (a time budget cuts from the end)."""
    points = sweep(tokens=tokens, t_max=t_max)
    by_name = {s.name: s for s in points}
    first = [by_name.get("iwslt", IWSLT), WMT, by_name.get("long", LONG)]
    return first + [s for s in points if s.name not in ("iwslt", "long")]


def smoke_plan() -> List[Shape]:
    """Small shapes for the CPU smoke mode: seconds on two cores, still a T sweep
    at fixed tokens per batch (B * T = 64)."""
    return [Shape(f"smoke-T{T}", B=64 // T, T=T, K=T, Cs=4, Ct=8) for T in (8, 16, 32)]


def floor_bytes(shape: Shape, dtype: torch.dtype, phase: str) -> int:
    """Bytes a perfect kernel must move (DESIGN.md section 2).

    forward reads S and A once: (Cs + Ct) * N; backward reads them again and writes
    dS: (Cs + Ct) * N + Cs * N; N counts elements times the element size.
    """
    e = torch.empty((), dtype=dtype).element_size()
    n = shape.elements * e
    fwd = (shape.Cs + shape.Ct) * n
    bwd = (shape.Cs + shape.Ct) * n + shape.Cs * n
    if phase == "forward":
        return fwd
    if phase == "backward":
        return bwd
    if phase == "forward+backward":
        return fwd + bwd
    raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def gradient_bytes(shape: Shape, dtype: torch.dtype, phase: str) -> int:
    """Bytes of the gradients a phase must hand back, whatever the method: dS in the
    maps' dtype plus dweight and dbias in fp32; none for a forward. They count in every
    contender's peak extra memory; subtracting them leaves each method's workspace."""
    if phase == "forward":
        return 0
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    e = torch.empty((), dtype=dtype).element_size()
    return shape.Cs * shape.elements * e + (shape.Ct * shape.Cs + shape.Ct) * 4


def input_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes of one input set (S and A; the mixer's parameters are negligible)."""
    e = torch.empty((), dtype=dtype).element_size()
    return (shape.Cs + shape.Ct) * shape.elements * e


@dataclass
class Inputs:
    """One set of loss inputs: per-layer maps and the mixer (fp32, like ``A2DLoss``)."""

    student: List[torch.Tensor]
    teacher: List[torch.Tensor]
    weight: torch.Tensor
    bias: torch.Tensor

    def leaves(self) -> Sequence[torch.Tensor]:
        return (*self.student, self.weight, self.bias)

    def clear_grads(self) -> None:
        # Gradients must not accumulate across repeats: the extra read-add-write of
        # dS would be timed as part of the backward.
        for t in self.leaves():
            t.grad = None


def attention_maps(B: int, H: int, T: int, K: int, dtype: torch.dtype, device,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Row-stochastic (B, H, T, K) maps, like real softmax attention probabilities."""
    logits = torch.randn(B, H, T, K, device=device, generator=generator) * 2.0
    return torch.softmax(logits, dim=-1).to(dtype)


def make_inputs(shape: Shape, dtype: torch.dtype, device, seed: int = 0) -> Inputs:
    """Random inputs of ``shape``: student maps require grad, teacher maps do not."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    h = shape.heads
    student = [attention_maps(shape.B, h, shape.T, shape.K, dtype, device, gen).requires_grad_()
               for _ in range(shape.Cs // h)]
    teacher = [attention_maps(shape.B, h, shape.T, shape.K, dtype, device, gen)
               for _ in range(shape.Ct // h)]
    # Conv2d(Cs, Ct, 1)'s default init range: U(-1/sqrt(Cs), 1/sqrt(Cs)).
    bound = shape.Cs ** -0.5
    weight = ((torch.rand(shape.Ct, shape.Cs, device=device, generator=gen) * 2 - 1) * bound).requires_grad_()
    bias = ((torch.rand(shape.Ct, device=device, generator=gen) * 2 - 1) * bound).requires_grad_()
    return Inputs(student, teacher, weight, bias)
