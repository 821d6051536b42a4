"""Triton backend of the A2D loss: host side (tile plan, launches, BACKEND).

The kernels live in ``_triton_forward`` / ``_triton_backward`` (shared tile helpers
in ``_triton_tiles``); ``FusedA2DKL`` in ``a2d_kernels.autograd`` applies the
reduction and the autograd plumbing. Launches per call: forward 2 kernels (map
mode; row mode 1 kernel + 1 ``sum``), backward 1 kernel + 1 ``sum`` over the
dweight partials + the zero dbias (+ a cast when the weight is not fp32).

Numerics: both modes compute the KL in a centered, second-order form (see
``_triton_forward``), so a small KL near convergence keeps its digits in fp32.

Design choices (DESIGN.md section 2):
- Per-layer maps are read in place: each layer group goes to the kernels as tuples
  of tensors and strides (Triton specializes on the tuple length, so any layer
  count works without a pointer table, a host-to-device copy or a concatenation).
  Any strides work; the layers of a group must share their query/key strides
  (contiguous layers always do) or they are copied, see _shared_position_strides.
- Both channel dimensions live whole in registers (padded to powers of two, >= 16
  for ``tl.dot``); the tile's position count shrinks as Ct grows so the (Ct, tile)
  fp32 logits plus the (Cs, tile) student tile fit. S is therefore read exactly
  once per pass; Ct, Cs <= 128 are supported (MAX_CHANNELS).
- Reductions across programs go through small partial buffers, folded in a fixed
  order: the same inputs give the same bits. Tile sizes are a fixed function of
  the shape (not autotuned), so the bits do not depend on a benchmark either.
- The mixing matmuls use IEEE fp32 (GPU ``tl.dot`` would otherwise use TF32,
  ~3e-4 relative), see DOT_PRECISION.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..problem import A2DProblem
from ._triton_backward import a2d_backward
from ._triton_forward import (MAP_PARTIALS, MAP_SAVED, map_forward_combine, map_forward_partials,
                              row_forward)

# Whether the kernels above were defined under the Triton interpreter (CPU tensors).
# Triton reads TRITON_INTERPRET when a kernel is decorated, so this is fixed at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest channel count per side: the (Ct, Cs) weight and, in backward, its fp32
# gradient accumulator are held in registers; beyond this the kernels would need
# to tile over channels (re-reading S), which is not implemented.
MAX_CHANNELS = 128

# Debug switch for tests: allocate every kernel output filled with NaN, so an
# element a kernel forgets to write cannot pass as a plausible value.
POISON_OUTPUTS = False


def _new_output(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _new_output_like(t: torch.Tensor) -> torch.Tensor:
    # empty_like keeps the strides of a dense input, so dS has the input's layout.
    if POISON_OUTPUTS:
        return torch.full_like(t, float("nan"))
    return torch.empty_like(t)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class TilePlan:
    """How one pass walks the maps: a tile is block_t rows x block_k keys; each
    program owns ``rows_per_chunk`` rows of one batch element."""

    cs_pad: int
    ct_pad: int
    block_t: int
    block_k: int
    rows_per_chunk: int
    n_chunks: int
    num_warps: int


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_tiles(problem: A2DProblem, backward: bool) -> TilePlan:
    """Tile sizes as a function of the shape only (deterministic bits per shape).

    Sized from sm_90 compiles of these kernels (register and spill counts, Triton
    3.9; not yet timed on a GPU, see _triton_compile_check): about 2048 (channel,
    position) values per program in forward and 1024 in backward, which also
    holds the dZ tile and the (Ct, Cs) dweight accumulator, keep every kernel at
    <= 16 spilled registers per thread up to Ct = 128, Cs = 64 (most at none);
    twice those tiles spill hundreds of bytes per thread.
    """
    B, T, K = problem.batch, problem.queries, problem.keys
    cs_pad = max(16, _pow2(problem.student_channels))
    ct_pad = max(16, _pow2(problem.teacher_channels))
    if INTERPRETED:
        positions = 64  # small fixed tiles: many tiles per test, fast numpy steps
    else:
        positions = max(16, (1024 if backward else 2048) // max(ct_pad, cs_pad))
    block_k = min(_pow2(K), positions)
    block_t = min(max(1, positions // block_k), _pow2(T))
    while block_t * block_k < 16:  # tl.dot needs every dimension >= 16
        block_t *= 2

    row_blocks = _cdiv(T, block_t)
    if problem.device.type == "cuda":
        # Enough programs to fill the GPU a few times over; more would only grow
        # the partial buffers (their size is bounded by this, not by T * K).
        target = 4 * _sm_count(problem.device.index if problem.device.index is not None
                               else torch.cuda.current_device())
        wanted = max(1, _cdiv(target, B))
    else:
        wanted = 2  # interpreter: exercise the cross-chunk combine
    n_chunks = min(row_blocks, wanted)
    rows_per_chunk = _cdiv(row_blocks, n_chunks) * block_t
    n_chunks = _cdiv(T, rows_per_chunk)
    if backward:  # the widest backward tiles spill at 8 warps, not at 16
        num_warps = 4 if ct_pad <= 32 else (8 if ct_pad <= 64 else 16)
    else:
        num_warps = 8
    return TilePlan(cs_pad, ct_pad, block_t, block_k, rows_per_chunk, n_chunks, num_warps)


def _shared_position_strides(layers: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """The layers of a group as the kernels read them: in place when they share
    their query and key strides (always true for contiguous layers, whatever their
    head counts), else a contiguous copy of each: the one case that copies, taken
    for layouts such as (B, T, H, K) views with unequal H per layer."""
    if len({t.stride()[2:] for t in layers}) == 1:
        return tuple(layers)
    return tuple(t.contiguous() for t in layers)


def _layer_group(layers: Sequence[torch.Tensor]):
    """Kernel arguments of a group of per-layer maps that share query/key strides:
    tensors, per layer (batch, head) strides, each layer's first channel, and the
    shared (query, key) strides."""
    starts, start = [], 0
    for t in layers:
        starts.append(start)
        start += t.shape[1]
    return (tuple(layers), tuple(tuple(t.stride()[:2]) for t in layers), tuple(starts),
            tuple(layers[0].stride()[2:]))


def _needs_64bit_offsets(*groups: Sequence[torch.Tensor]) -> bool:
    """Whether an in-map element offset t * stride_t + k * stride_k can pass 2^31."""
    for layers in groups:
        t = layers[0]
        if (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3)) >= 2 ** 31:
            return True
    return False


def _new_gradients(student: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """dS tensors, in the layers' own layout when they are dense and share their
    query/key strides, else contiguous."""
    grads = tuple(_new_output_like(s) for s in student)
    if len({g.stride()[2:] for g in grads}) == 1:
        return grads
    return tuple(_new_output(s.shape, s.dtype, s.device) for s in student)


def _mask_args(problem: A2DProblem):
    """(key mask, its 2 strides, query mask, its 2 strides); a uint8 view (no copy)
    of each bool validity mask, or a dummy pointer that the kernel never reads."""
    dummy = problem.weight
    out = []
    for mask in (problem.key_valid, problem.query_valid):
        if mask is None:
            out += [dummy, 0, 0]
        else:
            out += [mask.view(torch.uint8), mask.stride(0), mask.stride(1)]
    return out


# Precision of the in-register matmuls. "ieee" (fp32 FMA) is exact to fp32 and,
# at the tile sizes above, needed fewer registers and less shared memory than
# "tf32x3" in sm_90 compiles; plain "tf32" (~3e-4 relative) would be the next
# thing to time for 16-bit inputs, which TF32 holds exactly.
DOT_PRECISION = "ieee"


def _device_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _input_args(problem: A2DProblem, student, teacher):
    w = problem.weight
    return (*_layer_group(student), *_layer_group(teacher),
            w, w.stride(0), w.stride(1), *_mask_args(problem))


def _constexprs(problem: A2DProblem, plan: TilePlan, *groups):
    return dict(
        CS_PAD=plan.cs_pad, CT_PAD=plan.ct_pad, BLOCK_T=plan.block_t, BLOCK_K=plan.block_k,
        HAS_KEY_MASK=problem.key_valid is not None, HAS_QUERY_MASK=problem.query_valid is not None,
        DOT_PRECISION=DOT_PRECISION, OFFSETS_64=_needs_64bit_offsets(*groups),
        num_warps=plan.num_warps,
    )


def forward(problem: A2DProblem) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """(kl (B, Ct) fp32, saved statistics): map mode saves (B, 6, Ct), row mode
    (2, B, Ct, T); never anything of size T * K."""
    B, T, K = problem.batch, problem.queries, problem.keys
    Cs, Ct = problem.student_channels, problem.teacher_channels
    plan = plan_tiles(problem, backward=False)
    grid = (B, plan.n_chunks)
    dev = problem.device
    student = _shared_position_strides(problem.student)
    teacher = _shared_position_strides(problem.teacher)
    args = _input_args(problem, student, teacher)
    constexprs = _constexprs(problem, plan, student, teacher)
    with _device_guard(dev):
        if problem.normalize == "map":
            part = _new_output((B, plan.n_chunks, MAP_PARTIALS, Ct), torch.float32, dev)
            map_forward_partials[grid](
                *args, part, part.stride(0), part.stride(1), part.stride(2),
                T, K, Cs, Ct, plan.rows_per_chunk, **constexprs)
            kl = _new_output((B, Ct), torch.float32, dev)
            saved = _new_output((B, MAP_SAVED, Ct), torch.float32, dev)
            map_forward_combine[(B,)](
                part, part.stride(0), part.stride(1), part.stride(2),
                kl, saved, saved.stride(0), saved.stride(1), plan.n_chunks, Ct,
                CT_PAD=plan.ct_pad, num_warps=1 if plan.ct_pad <= 64 else 2)
            return kl, (saved,)

        part = _new_output((B, plan.n_chunks, Ct), torch.float32, dev)
        row_stats = _new_output((2, B, Ct, T), torch.float32, dev)
        row_forward[grid](
            *args, part, part.stride(0), part.stride(1), row_stats,
            B, T, K, Cs, Ct, plan.rows_per_chunk, **constexprs)
        # The chunks of a row-mode map hold disjoint rows: a plain ordered sum.
        return part.sum(dim=1), (row_stats,)


def backward(problem: A2DProblem, saved: Tuple[torch.Tensor, ...], grad_scale: torch.Tensor,
             need_student_grad: bool):
    B, T, K = problem.batch, problem.queries, problem.keys
    Cs, Ct = problem.student_channels, problem.teacher_channels
    (stats,) = saved
    plan = plan_tiles(problem, backward=True)
    dev = problem.device
    row_mode = problem.normalize == "row"

    student = _shared_position_strides(problem.student)
    teacher = _shared_position_strides(problem.teacher)
    d_student: List[Optional[torch.Tensor]] = [None] * len(student)
    if need_student_grad:
        d_student = list(_new_gradients(problem.student))
        ds_layers = tuple(d_student)
    else:
        ds_layers = student  # never written: WRITE_DS=False
    ds_ptrs, ds_strides, _, ds_pos_strides = _layer_group(ds_layers)

    dw_part = _new_output((B, plan.n_chunks, Ct, Cs), torch.float32, dev)
    grad_scale = grad_scale.to(device=dev, dtype=torch.float32)
    with _device_guard(dev):
        a2d_backward[(B, plan.n_chunks)](
            *_layer_group(student), *_layer_group(teacher), ds_ptrs, ds_strides, ds_pos_strides,
            problem.weight, problem.weight.stride(0), problem.weight.stride(1), *_mask_args(problem),
            stats, 0 if row_mode else stats.stride(0), 0 if row_mode else stats.stride(1), grad_scale,
            dw_part, B, T, K, Cs, Ct, plan.rows_per_chunk,
            ROW_MODE=row_mode, WRITE_DS=need_student_grad,
            **_constexprs(problem, plan, student, teacher, ds_layers))

    d_weight = dw_part.sum(dim=(0, 1)).to(problem.weight.dtype).reshape(problem.weight.shape)
    # The loss is invariant to a per-channel shift of Z in both modes: dbias == 0.
    d_bias = None if problem.bias is None else torch.zeros_like(problem.bias)
    return d_student, d_weight, d_bias


class TritonBackend:
    """The ``KernelBackend`` contract of ``a2d_kernels.dispatch`` for Triton."""

    name = "triton"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        device = torch.device(device)
        if device.type == "cuda":
            if INTERPRETED:
                return ("TRITON_INTERPRET=1 was set when a2d_kernels.ops.triton_a2d was imported: "
                        "the kernels run on the CPU interpreter and cannot take CUDA tensors")
            return None
        if INTERPRETED:
            return None
        return (f"Triton kernels need CUDA tensors, got device {device}; for CPU tensors set "
                "TRITON_INTERPRET=1 before importing a2d_kernels (slow, meant for tests)")

    def unsupported_reason(self, problem: A2DProblem) -> Optional[str]:
        dtypes = {problem.student[0].dtype, problem.teacher[0].dtype, problem.weight.dtype}
        if torch.float64 in dtypes:
            return ("float64 inputs: the Triton kernels accumulate in float32; use "
                    "backend='reference' for float64")
        for side, count in (("student", problem.student_channels),
                            ("teacher", problem.teacher_channels)):
            if count > MAX_CHANNELS:
                return (f"{count} {side} channels: the Triton kernels hold every channel in "
                        f"registers and support at most {MAX_CHANNELS} per side")
        return None

    def saved_specs(self, problem: A2DProblem):
        """Shapes of ``forward``'s saved statistics, for the custom ops' fakes."""
        B, Ct, T = problem.batch, problem.teacher_channels, problem.queries
        if problem.normalize == "map":
            return (((B, MAP_SAVED, Ct), torch.float32),)
        return (((2, B, Ct, T), torch.float32),)

    def forward(self, problem: A2DProblem):
        return forward(problem)

    def backward(self, problem, saved, grad_scale, need_student_grad):
        return backward(problem, saved, grad_scale, need_student_grad)


BACKEND = TritonBackend()
