"""The implementations the A2D benchmarks race.

Each contender turns an :class:`~cases.Inputs` into the 0-dim loss, differentiable
with respect to the student maps and the mixer, for one normalization mode. The
reduction is "sum" throughout (the released default); it changes nothing about the
cost.

- ``eager``: the pure-PyTorch reference (``backend="reference"``), what you would
  write yourself.
- ``compiled``: the same reference under ``torch.compile`` (dynamic shapes, on the
  stacked maps, so one compilation per mode and dtype serves every shape).
- ``triton`` / ``cuda``: the fused backends of this package.
- ``peer``: a pipeline a practitioner could assemble from existing kernels: the 1x1
  mixing as an ``einsum`` in the input dtype, fp32 ``log_softmax``, then
  Liger-Kernel's fused KL-divergence kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from a2d_kernels import a2d_kl, backends

from cases import Inputs

LossFn = Callable[[Inputs], torch.Tensor]
# (log_q, p) -> summed KL(p || q), both (rows, entries): the peer pipeline's last step.
KLSum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Run order: eager first (every ratio needs it), compiled last (it spends its first
# calls compiling, so under a time budget it takes what the others leave).
CONTENDER_NAMES = ("eager", "triton", "cuda", "peer", "compiled")
# The reason given for every contender the CPU smoke mode leaves out; ``--force``
# overrides exactly this reason (to debug the benchmark itself on a CPU), no other.
NO_CUDA = "GPU contender skipped: no CUDA device (CPU smoke mode)"


@dataclass
class Contender:
    name: str
    description: str
    # device -> None when it can run there, else the reason it is skipped
    unavailable_reason: Callable[[torch.device], Optional[str]]
    # normalize mode -> loss function
    build: Callable[[str], LossFn]


# ---------------------------------------------------------------- eager / fused


def _backend_loss(backend: str) -> Callable[[str], LossFn]:
    def build(normalize: str) -> LossFn:
        def loss(x: Inputs) -> torch.Tensor:
            return a2d_kl(x.student, x.teacher, x.weight, x.bias,
                          normalize=normalize, reduction="sum", backend=backend)
        return loss
    return build


def _fused_unavailable(backend: str) -> Callable[[torch.device], Optional[str]]:
    def why(device: torch.device) -> Optional[str]:
        status = backends(device).get(backend)
        if status is None:
            return f"backend {backend!r} is not registered in a2d_kernels.backends()"
        if not status["available"]:
            return f"backend unavailable: {status['reason']}"
        return NO_CUDA if device.type != "cuda" else None
    return why


# ---------------------------------------------------------------- torch.compile


def _reference_map(student, teacher, weight, bias):
    return a2d_kl(student, teacher, weight, bias, normalize="map", reduction="sum",
                  backend="reference")


def _reference_row(student, teacher, weight, bias):
    return a2d_kl(student, teacher, weight, bias, normalize="row", reduction="sum",
                  backend="reference")


_compiled: Dict[str, Callable] = {}


def _allow_recompiles() -> None:
    # Each dtype and layer count is a new graph; the default limit (8) would make
    # dynamo silently fall back to eager part-way through the sweep.
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)


def _build_compiled(normalize: str) -> LossFn:
    if normalize not in _compiled:
        _allow_recompiles()
        fn = _reference_map if normalize == "map" else _reference_row
        _compiled[normalize] = torch.compile(fn, dynamic=True)
    compiled = _compiled[normalize]

    def loss(x: Inputs) -> torch.Tensor:
        # Stacked outside the compiled region (and timed with it): a list argument
        # would make every layer count a new graph, minutes of compilation each.
        S = torch.cat(x.student, dim=1) if len(x.student) > 1 else x.student[0]
        A = torch.cat(x.teacher, dim=1) if len(x.teacher) > 1 else x.teacher[0]
        return compiled(S, A, x.weight, x.bias)
    return loss


def _compiled_unavailable(device: torch.device) -> Optional[str]:
    # Inductor on the CPU is a different code generator; the CPU smoke mode only
    # checks that the benchmark runs, so it skips the minute of compilation.
    return NO_CUDA if device.type != "cuda" else None


# ---------------------------------------------------------------- peer pipeline


def peer_loss_fn(normalize: str, kl_sum: KLSum) -> LossFn:
    """einsum mixing + fp32 log-softmax + a KL kernel ``kl_sum(log_q, p)``.

    The map mode's teacher distribution is the softmax of the teacher maps used as
    logits (DESIGN.md section 1); the row mode's teacher rows are used as given
    probabilities. No masks: the benchmark runs unmasked, as the release does.
    """
    if normalize not in ("map", "row"):
        raise ValueError(f"normalize must be 'map' or 'row', got {normalize!r}")

    def loss(x: Inputs) -> torch.Tensor:
        S = torch.cat(x.student, dim=1)
        A = torch.cat(x.teacher, dim=1)
        B, Ct, T, K = A.shape
        Z = torch.einsum("ck,bktx->bctx", x.weight.to(S.dtype), S) + x.bias.to(S.dtype)[:, None, None]
        if normalize == "map":
            log_q = torch.log_softmax(Z.reshape(B * Ct, T * K), dim=-1, dtype=torch.float32)
            with torch.no_grad():
                p = torch.softmax(A.reshape(B * Ct, T * K), dim=-1, dtype=torch.float32)
        else:
            log_q = torch.log_softmax(Z, dim=-1, dtype=torch.float32).reshape(B * Ct * T, K)
            p = A.reshape(B * Ct * T, K).float()
        return kl_sum(log_q, p)
    return loss


def torch_kl_sum(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The same last step in plain PyTorch (used to test the pipeline on the CPU)."""
    return torch.nn.functional.kl_div(log_q, p, reduction="sum")


def _liger_kl_sum() -> KLSum:
    from liger_kernel.transformers import LigerKLDIVLoss

    module = LigerKLDIVLoss(reduction="sum")
    return lambda log_q, p: module(log_q, p)


def _peer_unavailable(device: torch.device) -> Optional[str]:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # ImportError, or its Triton failing to initialise
        return f"liger-kernel is not importable ({type(exc).__name__}: {exc}); pip install liger-kernel"
    return NO_CUDA if device.type != "cuda" else None


def _build_peer(normalize: str) -> LossFn:
    return peer_loss_fn(normalize, _liger_kl_sum())


# ---------------------------------------------------------------- registry


CONTENDERS: Dict[str, Contender] = {
    "eager": Contender("eager", "a2d_kl(backend='reference'), PyTorch eager",
                       lambda device: None, _backend_loss("reference")),
    "compiled": Contender("compiled", "the reference under torch.compile(dynamic=True)",
                          _compiled_unavailable, _build_compiled),
    "triton": Contender("triton", "a2d_kl(backend='triton'), fused Triton kernels",
                        _fused_unavailable("triton"), _backend_loss("triton")),
    "cuda": Contender("cuda", "a2d_kl(backend='cuda'), fused CUDA kernels",
                      _fused_unavailable("cuda"), _backend_loss("cuda")),
    "peer": Contender("peer", "einsum mixing + fp32 log_softmax + Liger-Kernel KLDiv",
                      _peer_unavailable, _build_peer),
}


def select(names: List[str]) -> List[Contender]:
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; choose from {list(CONTENDER_NAMES)}")
    return [CONTENDERS[n] for n in names]
