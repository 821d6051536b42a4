"""Input makers and the independent float64 oracle shared by the test modules.

``independent_a2d_kl`` restates DESIGN.md section 1 a second way (``conv2d`` for the
mixing, ``F.kl_div`` per map or per row, explicit loops over batch and channel and
boolean indexing for the masks), so it shares no code with ``a2d_kernels.reference``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F


def attention_maps(B: int, heads: Sequence[int], T: int, K: int, dtype=torch.float32,
                   device="cpu", requires_grad=False, sparse: bool = False) -> List[torch.Tensor]:
    """Per-layer softmax-normalized maps like a real attention layer returns.

    ``sparse`` zeroes some probabilities (as causal or padded attention does) so the
    p = 0 branch of "row" mode is exercised.
    """
    layers = []
    for h in heads:
        logits = 3 * torch.randn(B, h, T, K, dtype=torch.float64, device=device)
        if sparse and K > 1:
            drop = torch.rand(B, h, T, K, device=device) < 0.3
            drop[..., 0] = False
            logits = logits.masked_fill(drop, float("-inf"))
        m = logits.softmax(-1).to(dtype)
        layers.append(m.requires_grad_(requires_grad))
    return layers


def padding_mask(B: int, n: int, device="cpu") -> torch.Tensor:
    """(B, n) bool, True = padding: a different number of trailing pads per row, never all."""
    lengths = torch.randint(1, n + 1, (B,), device=device)
    lengths[0] = n  # one unpadded row, as in a real batch
    return torch.arange(n, device=device)[None, :] >= lengths[:, None]


def ragged_masks(B: int, T: int, K: int, which: str, device="cpu"):
    """(key_padding_mask, query_mask) for which in {"none", "key", "query", "both"};
    True = padding, ragged lengths.

    Batch element 0 of a key mask has every key padded, so a fully masked map / row
    is covered. The other rows keep over half their keys: with few keys left, a row's
    p (not renormalized) has little mass and its "KL" becomes a cancellation of terms
    that no fp32 method resolves to 1e-5 of the (tiny) result.
    """
    key_mask = query_mask = None
    if which in ("key", "both"):
        lengths = torch.randint(K // 2 + 1, K + 1, (B,))
        key_mask = torch.arange(K)[None, :] >= lengths[:, None]
        if B > 1:
            key_mask[0] = True
        key_mask = key_mask.to(device)
    if which in ("query", "both"):
        lengths = torch.randint(1, T + 1, (B,))
        query_mask = (torch.arange(T)[None, :] >= lengths[:, None]).to(device)
    return key_mask, query_mask


def fill_excluded(maps, key_mask, query_mask, value: float):
    """Copies of ``maps`` (B, H, T, K) with every entry the masks exclude set to ``value``
    (what a model's fully padded softmax rows hold: NaN), keeping ``requires_grad``."""
    B, _, T, K = maps[0].shape
    excluded = torch.zeros(B, 1, T, K, dtype=torch.bool, device=maps[0].device)
    if key_mask is not None:
        excluded = excluded | key_mask[:, None, None, :]
    if query_mask is not None:
        excluded = excluded | query_mask[:, None, :, None]
    return [m.detach().masked_fill(excluded, value).requires_grad_(m.requires_grad) for m in maps]


def independent_a2d_kl(student, teacher, weight, bias, normalize="map", reduction="sum",
                       key_padding_mask: Optional[torch.Tensor] = None,
                       query_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    S = torch.cat([s.double() for s in student], 1)
    A = torch.cat([a.double() for a in teacher], 1).detach()
    B, _, T, K = S.shape
    Ct = A.shape[1]
    W = weight.double()[:, :, None, None]
    Z = F.conv2d(S, W, None if bias is None else bias.double())
    key_ok = torch.ones(B, K, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask.cpu()
    query_ok = torch.ones(B, T, dtype=torch.bool) if query_mask is None else ~query_mask.cpu()

    total = torch.zeros((), dtype=torch.float64, device=S.device)
    terms = 0
    for b in range(B):
        kv, qv = key_ok[b].to(S.device), query_ok[b].to(S.device)
        for c in range(Ct):
            if normalize == "map":
                terms += 1
                z = Z[b, c][qv][:, kv].flatten()
                a = A[b, c][qv][:, kv].flatten()
                if z.numel():
                    total = total + F.kl_div(z.log_softmax(0), a.log_softmax(0),
                                             reduction="sum", log_target=True)
            else:
                for t in range(T):
                    if not qv[t]:
                        continue
                    terms += 1
                    if kv.any():
                        total = total + F.kl_div(Z[b, c, t][kv].log_softmax(0), A[b, c, t][kv],
                                                 reduction="sum")
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / B
    return total / max(terms, 1)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64; NaN anywhere gives inf so it never passes."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float = 0.0, what: str = ""):
    """||out - ref|| <= rtol * ||ref|| + atol (norms in float64); NaN never passes.

    ``atol`` matters only for tensors that are mathematically zero (the bias gradient
    in both modes), where a relative error is meaningless.
    """
    out64, ref64 = out.double(), ref.double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values in the output"
    diff, scale = (out64 - ref64).norm().item(), ref64.norm().item()
    assert diff <= rtol * scale + atol, f"{what}: ||out - ref|| = {diff:.3e}, ||ref|| = {scale:.3e}, rtol {rtol}"


def grads(loss: torch.Tensor, tensors) -> List[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors, allow_unused=False))
