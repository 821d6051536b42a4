"""The one place that decides which implementation computes the loss.

Fused backends (Triton, CUDA) live in ``a2d_kernels.ops`` and implement the small
:class:`KernelBackend` contract; the autograd glue, the reduction and the dispatch
are shared here and in ``autograd.py`` so each backend holds only its math.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from .problem import A2DProblem

# family -> name -> module that defines ``BACKEND`` (imported lazily: a missing Triton
# or an unbuilt CUDA extension must never break ``import a2d_kernels``). The order is
# the order ``backend="auto"`` tries them on CUDA (see ``auto_order``). "map": the loss
# of attention maps (``a2d_kl``, the ``KernelBackend`` contract below); "qk": the loss
# from queries and keys (``a2d_kl_qk``; same availability methods, QK problems).
_KERNEL_MODULES = {
    "map": {"triton": "a2d_kernels.ops.triton_a2d", "cuda": "a2d_kernels.ops.cuda_a2d"},
    "qk": {"triton": "a2d_kernels.ops.triton_qk"},
}


class KernelBackend(Protocol):
    """What a fused backend provides. Shapes: B batch, Ct teacher channels, T queries.

    ``forward(problem) -> (kl, saved)``: ``kl`` is the (B, Ct) fp32 tensor of summed KL
    per (batch, teacher channel) (row mode: summed over the map's valid rows); ``saved``
    a tuple of O(B*Ct*T) statistics for backward, never anything of size T*K.

    ``backward(problem, saved, grad_scale, need_student_grad) -> (d_student, d_weight,
    d_bias)``: ``grad_scale`` is a 0-dim fp32 device tensor, the gradient of the loss
    with respect to every KL term (upstream gradient / reduction denominator); it is
    read on the device, never with ``.item()``. ``d_student`` is a list with one tensor
    per student layer (shape and dtype of that layer) or None entries when
    ``need_student_grad`` is False; ``d_weight`` has the weight's shape and dtype,
    ``d_bias`` the bias's (None when the problem has no bias). Every returned tensor is
    freshly allocated (never an input, a view of one, or a view of another output).

    ``saved_specs(problem) -> tuple of (shape, dtype)``: one entry per tensor that
    ``forward`` returns in ``saved``, computed from shapes only. ``torch.compile`` traces
    the kernels' custom ops (``a2d_kernels.custom_ops``) with fake tensors allocated
    from it, so it must match ``forward`` exactly (the tests check it with opcheck).
    ``unavailable_reason``/``unsupported_reason`` may only look at devices, shapes and
    dtypes: Dynamo traces them when the loss is compiled.
    """

    name: str

    def unavailable_reason(self, device: torch.device) -> Optional[str]: ...

    def unsupported_reason(self, problem: A2DProblem) -> Optional[str]: ...

    def saved_specs(self, problem: A2DProblem) -> Tuple[Tuple[Tuple[int, ...], torch.dtype], ...]: ...

    def forward(self, problem: A2DProblem) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]: ...

    def backward(
        self,
        problem: A2DProblem,
        saved: Tuple[torch.Tensor, ...],
        grad_scale: torch.Tensor,
        need_student_grad: bool,
    ) -> Tuple[List[Optional[torch.Tensor]], torch.Tensor, Optional[torch.Tensor]]: ...


_loaded: Dict[Tuple[str, str], Tuple[Optional[KernelBackend], Optional[str]]] = {}


def _load(name: str, family: str = "map") -> Tuple[Optional[KernelBackend], Optional[str]]:
    """Import a kernel backend once; return (backend, None) or (None, why not)."""
    key = (family, name)
    if key not in _loaded:
        try:
            module = importlib.import_module(_KERNEL_MODULES[family][name])
            _loaded[key] = (module.BACKEND, None)
        except ImportError as exc:  # triton not installed, extension not built, ...
            _loaded[key] = (None, f"cannot be imported: {exc}")
    return _loaded[key]


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# Evaluated once while torch.compile traces (its result baked into the graph): the first
# call imports the kernel module, which Dynamo cannot trace (a fullgraph=True error).
@torch.compiler.assume_constant_result
def _reason(name: str, device: torch.device, family: str = "map") -> Optional[str]:
    if name == "reference":
        return None
    backend, why = _load(name, family)
    if backend is None:
        return why
    return backend.unavailable_reason(device)


def backends(device: Optional[torch.device] = None) -> Dict[str, Dict[str, object]]:
    """Which backends can run here: ``{name: {"available": bool, "reason": str}}``.

    ``device`` defaults to the current CUDA device when there is one, else the CPU.
    """
    device = torch.device(device) if device is not None else _default_device()
    report = {}
    for name in ("reference", *_KERNEL_MODULES["map"]):
        why = _reason(name, device)
        report[name] = {"available": why is None, "reason": why or "available"}
    return report


def auto_order(problem, family: str = "map") -> Sequence[str]:
    """Fused backends ``backend="auto"`` tries, in order, before the reference.

    On the CPU the Triton interpreter is far slower than the reference, so auto never
    picks a fused backend there. On CUDA, Triton goes first. Both backends mix with
    fp32 FMAs (Triton's ``tl.dot`` runs with ``input_precision="ieee"``, not on tensor
    cores), so this order is provisional: no GPU timing of either backend exists yet
    (README, "Choosing a backend"), and it is to be set per shape from ``benchmarks/``
    results.
    """
    if problem.device.type != "cuda":
        return ()
    return tuple(_KERNEL_MODULES[family])


def backend_names(family: str = "map") -> Tuple[str, ...]:
    """The ``backend=`` values a family accepts."""
    return ("auto", "reference", *_KERNEL_MODULES[family])


def select_backend(name: str, problem, family: str = "map") -> Optional[KernelBackend]:
    """The fused backend to run ``problem`` (an ``A2DProblem``, or a ``QKProblem`` for
    the "qk" family), or None for the reference. Raises for a bad request."""
    allowed = backend_names(family)
    if name not in allowed:
        mode = " in QK mode" if family == "qk" else ""
        raise ValueError(f"backend must be one of {allowed}{mode}, got {name!r}")
    if name == "reference":
        return None
    if name == "auto":
        for candidate in auto_order(problem, family):
            if _reason(candidate, problem.device, family) is None:
                backend = _load(candidate, family)[0]
                if backend.unsupported_reason(problem) is None:
                    return backend
        return None
    why = _reason(name, problem.device, family)
    if why is not None:
        raise RuntimeError(f"backend={name!r} is not available on {problem.device}: {why}")
    backend = _load(name, family)[0]
    why = backend.unsupported_reason(problem)
    if why is not None:
        raise ValueError(f"backend={name!r} cannot compute this input: {why}")
    return backend
