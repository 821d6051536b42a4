"""The CUDA backend: the compiled extension ``a2d_kernels._C`` behind the KernelBackend contract.

The extension (``csrc/``) takes integers only: data addresses, sizes, strides, dtype
codes, the device index and the current stream's handle. This module turns an
:class:`A2DProblem` into those integers, allocates outputs and workspaces with torch
(so they come from torch's caching allocator and stay stream-ordered), and launches.

Per-layer maps are read in place through a per-channel table of
``(address, stride_b, stride_t)`` rows (students, teachers, then the student gradients)
that the kernels receive by value, as a launch parameter: no host-to-device copy, no
synchronization. Only a layer whose key stride is not 1 is copied first
(``.contiguous()``); attention maps from Hugging Face or fairseq never are.

The same arguments drive ``_C.host_forward`` / ``_C.host_backward`` when the problem's
tensors are on the CPU: the CPU emulation of the kernels that CI checks against the
reference on machines without a GPU (see :func:`host_forward` / :func:`host_backward`).
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..problem import A2DProblem

try:  # the extension is optional: a missing build only makes this backend unavailable
    from .. import _C
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = str(exc)

# Codes shared with csrc/a2d_tile.cuh (enum DType, enum Mode).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MODE_CODES = {"map": 0, "row": 1}

# Tests set this so every output starts as NaN: an element a kernel forgets to write
# then fails the comparison instead of passing as whatever the allocator returned.
POISON_OUTPUTS = False


def extension_error() -> Optional[str]:
    """Why ``a2d_kernels._C`` cannot be imported, or None when it can."""
    return None if _C is not None else f"CUDA extension not built: {_IMPORT_ERROR}"


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _device_problem(index: int) -> str:
    return _C.device_problem(index)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _key_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels read keys with stride 1; any other layout is copied once."""
    return t if t.stride(3) == 1 or t.shape[3] == 1 else t.contiguous()


def _channel_table(layers: Sequence[torch.Tensor]) -> List[int]:
    """Flat (address of channel h at b = t = k = 0, stride_b, stride_t) per channel, layer-major."""
    table = []
    for t in layers:
        size, base, stride_b, stride_h, stride_t = t.element_size(), t.data_ptr(), *t.stride()[:3]
        for h in range(t.shape[1]):
            table += (base + h * stride_h * size, stride_b, stride_t)
    return table


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _base_args(problem: A2DProblem, student, teacher, weight, bias, key_valid, query_valid) -> Dict[str, int]:
    return dict(
        B=problem.batch, T=problem.queries, K=problem.keys,
        Cs=problem.student_channels, Ct=problem.teacher_channels,
        mode=_MODE_CODES[problem.normalize],
        dtype=_DTYPE_CODES[student[0].dtype], t_dtype=_DTYPE_CODES[teacher[0].dtype],
        w_dtype=_DTYPE_CODES[weight.dtype],
        b_dtype=_DTYPE_CODES[bias.dtype] if bias is not None else 0,
        weight=_ptr(weight), bias=_ptr(bias),
        key_valid=_ptr(key_valid), query_valid=_ptr(query_valid),
    )


# Shapes and dtypes only (no pointers), evaluated once while torch.compile traces and
# baked into the graph: Dynamo can neither call the pybind11 planner nor read
# data_ptr() of the tensors it traces, so the dispatch check would break the graph.
@torch.compiler.assume_constant_result
def _plan_error(B: int, T: int, K: int, Cs: int, Ct: int, normalize: str, dtype: torch.dtype,
                t_dtype: torch.dtype, w_dtype: torch.dtype, b_dtype: Optional[torch.dtype]) -> Optional[str]:
    args = dict(B=B, T=T, K=K, Cs=Cs, Ct=Ct, mode=_MODE_CODES[normalize], dtype=_DTYPE_CODES[dtype],
                t_dtype=_DTYPE_CODES[t_dtype], w_dtype=_DTYPE_CODES[w_dtype],
                b_dtype=0 if b_dtype is None else _DTYPE_CODES[b_dtype],
                weight=0, bias=0, key_valid=0, query_valid=0)
    try:
        _C.plan(args)
    except ValueError as exc:
        return str(exc)
    return None


class _Launch:
    """One problem's arguments, on whichever device its tensors live (CUDA or CPU)."""

    def __init__(self, problem: A2DProblem, tile: Optional[Dict[str, int]] = None):
        self.problem = problem
        self.device = problem.device
        self.student = [_key_contiguous(s) for s in problem.student]
        self.teacher = [_key_contiguous(a) for a in problem.teacher]
        self.weight = problem.weight.contiguous()
        self.bias = None if problem.bias is None else problem.bias.contiguous()
        self.key_valid = None if problem.key_valid is None else problem.key_valid.contiguous()
        self.query_valid = None if problem.query_valid is None else problem.query_valid.contiguous()
        self.args = _base_args(problem, self.student, self.teacher, self.weight, self.bias,
                               self.key_valid, self.query_valid)
        if self.device.type == "cuda":
            index = _device_index(self.device)
            self.args.update(device=index, num_sms=_num_sms(index),
                             stream=torch.cuda.current_stream(self.device).cuda_stream)
        self.args.update(tile or {})
        self.plan = _C.plan(self.args)

    def _empty(self, shape, dtype) -> torch.Tensor:
        if POISON_OUTPUTS:
            return torch.full(shape, float("nan"), dtype=dtype, device=self.device)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _floats(self, *shape) -> torch.Tensor:
        return self._empty(shape, torch.float32)

    def _run(self, name: str, args: Dict[str, int]) -> None:
        on_gpu = self.device.type == "cuda"
        getattr(_C, name if on_gpu else f"host_{name}")(args)

    def forward(self) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        p = self.problem
        B, Ct, T = p.batch, p.teacher_channels, p.queries
        stat_shape = (B, Ct, 2) if p.normalize == "map" else (B, Ct, T)
        kl, stat0, stat1 = self._floats(B, Ct), self._floats(*stat_shape), self._floats(*stat_shape)
        work = self._floats(self.plan["forward_work_floats"])
        table = _channel_table(self.student) + _channel_table(self.teacher)
        self._run("forward", dict(self.args, table=table, kl=_ptr(kl), stat0=_ptr(stat0),
                                  stat1=_ptr(stat1), work=_ptr(work)))
        return kl, (stat0, stat1)

    def backward(self, saved: Sequence[torch.Tensor], grad_scale: torch.Tensor, need_student_grad: bool):
        stat0, stat1 = (s.contiguous() for s in saved)
        grad_scale = grad_scale.to(device=self.device, dtype=torch.float32).contiguous()
        d_student = [self._empty(s.shape, s.dtype) for s in self.student] if need_student_grad else []
        d_weight = self._empty(self.weight.shape, self.weight.dtype)
        d_bias = None if self.bias is None else self._empty(self.bias.shape, self.bias.dtype)
        work = self._floats(self.plan["backward_work_floats"])
        table = _channel_table(self.student) + _channel_table(self.teacher) + _channel_table(d_student)
        self._run("backward", dict(self.args, table=table, stat0=_ptr(stat0), stat1=_ptr(stat1),
                                   work=_ptr(work), grad_scale=_ptr(grad_scale), d_weight=_ptr(d_weight),
                                   d_bias=_ptr(d_bias), need_ds=int(need_student_grad)))
        if not need_student_grad:
            return [None] * len(self.student), d_weight, d_bias
        return d_student, d_weight, d_bias


class CudaA2D:
    """``backend="cuda"``: see the module docstring and ``backends.KernelBackend``."""

    name = "cuda"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        why = extension_error()
        if why is not None:
            return why
        device = torch.device(device)
        if device.type != "cuda":
            return f"not a CUDA device ({device})"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        return _device_problem(_device_index(device)) or None

    def unsupported_reason(self, problem: A2DProblem) -> Optional[str]:
        tensors = (*problem.student, *problem.teacher, problem.weight,
                   *(() if problem.bias is None else (problem.bias,)))
        if any(t.dtype not in _DTYPE_CODES for t in tensors):
            return "float64 inputs are computed by the reference backend (the kernels take fp32/bf16/fp16)"
        bias_dtype = None if problem.bias is None else problem.bias.dtype
        return _plan_error(problem.batch, problem.queries, problem.keys, problem.student_channels,
                           problem.teacher_channels, problem.normalize, problem.student[0].dtype,
                           problem.teacher[0].dtype, problem.weight.dtype, bias_dtype)

    def saved_specs(self, problem: A2DProblem):
        B, Ct, T = problem.batch, problem.teacher_channels, problem.queries
        # map: (lseZ, lseA) and (shift, residual) per map; row: lse and mass per row (csrc Args)
        shape = (B, Ct, 2) if problem.normalize == "map" else (B, Ct, T)
        return ((shape, torch.float32), (shape, torch.float32))

    def forward(self, problem: A2DProblem):
        return _Launch(problem).forward()

    def backward(self, problem: A2DProblem, saved, grad_scale: torch.Tensor, need_student_grad: bool):
        return _Launch(problem).backward(saved, grad_scale, need_student_grad)


BACKEND = CudaA2D()


def host_forward(problem: A2DProblem, **tile):
    """The forward kernels' arithmetic on the CPU (CPU tensors): ``(kl, saved)`` as
    ``BACKEND.forward`` returns them. ``tile`` may cap ``max_rows`` / ``max_keys`` and
    set ``num_sms`` so that small problems still span several tiles and blocks."""
    if _C is None:
        raise RuntimeError(extension_error())
    return _Launch(problem, tile).forward()


def host_backward(problem: A2DProblem, saved, grad_scale: torch.Tensor, need_student_grad: bool = True, **tile):
    """The backward kernels' arithmetic on the CPU, as ``BACKEND.backward`` returns it."""
    if _C is None:
        raise RuntimeError(extension_error())
    return _Launch(problem, tile).backward(saved, grad_scale, need_student_grad)
