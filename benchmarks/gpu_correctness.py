"""The ``check`` stage's correctness check: one fused backend against the float64 reference.

For every case (the three realistic shapes, both modes, fp32 and bf16, plus a masked
case at the first shape) the loss and every gradient (student maps, weight, bias) are
compared with the same computation in float64, with an upstream gradient that is not 1.
A case passes at DESIGN.md section 4's tolerances (fp32 < 1e-5, bf16 < 1e-2; NaN never
passes); a second evaluation checks that the backend is deterministic (same bits). Next
to each error the row keeps the error of the reference itself run on the same inputs in
fp32 (``floor_*``): what plain fp32 arithmetic gets, so a failing row says whether the
kernel is wrong or the case is beyond fp32 (map mode at long shapes is: its KL is a
small difference of large log-sum-exps).

It runs in a child process (``gpu_check.py --check-backend NAME``, started by the
``check`` stage), which writes ``check_<backend>.json`` after every case. Nothing here
imports torch at module level: the orchestrator imports this module for
``check_line`` and the tolerances and stays free of torch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

FP32_TOL = 1e-5
BF16_TOL = 1e-2
UPSTREAM = 0.37  # not 1: the upstream gradient must reach every output


def _rel_err(out, ref, floor: float = 0.0) -> float:
    import torch

    out = out.detach().to(torch.float64).flatten()
    ref = ref.detach().to(torch.float64).flatten()
    if not torch.isfinite(out).all():
        return float("nan")
    denom = max(ref.norm().item(), floor)
    return (out - ref).norm().item() / denom if denom > 0 else (out - ref).norm().item()


def _grads(loss_fn, x, mask_kwargs):
    """Loss and gradients (student maps concatenated, weight, bias) of one evaluation."""
    import torch

    x.clear_grads()
    loss = loss_fn(x, mask_kwargs)
    (loss * UPSTREAM).backward()
    d_student = torch.cat([s.grad.flatten() for s in x.student])
    return loss.detach(), d_student, x.weight.grad.clone(), x.bias.grad.clone()


def check_backend(backend: str, out_dir: Path, device: str = "cuda", shapes=None) -> List[dict]:
    """Compare ``backend`` with the float64 reference; print and return one row per case.

    ``shapes`` defaults to the three realistic shapes; the masked case uses the first.
    """
    import torch

    import cases
    from a2d_kernels import a2d_kl

    device = torch.device(device)
    shapes = list(shapes) if shapes is not None else list(cases.REALISTIC)

    def fused(x, masks):
        return a2d_kl(x.student, x.teacher, x.weight, x.bias, normalize=masks["normalize"],
                      reduction="sum", key_padding_mask=masks.get("kpm"),
                      query_mask=masks.get("qm"), backend=backend)

    def reference_fp32(x, masks):
        return a2d_kl(x.student, x.teacher, x.weight, x.bias, normalize=masks["normalize"],
                      reduction="sum", key_padding_mask=masks.get("kpm"),
                      query_mask=masks.get("qm"), backend="reference")

    def reference(x, masks):
        # The same values in float64: the oracle of DESIGN.md section 4.
        up = cases.Inputs(
            [s.detach().double().requires_grad_() for s in x.student],
            [a.double() for a in x.teacher],
            x.weight.detach().double().requires_grad_(), x.bias.detach().double().requires_grad_())
        return up, a2d_kl(up.student, up.teacher, up.weight, up.bias, normalize=masks["normalize"],
                          reduction="sum", key_padding_mask=masks.get("kpm"),
                          query_mask=masks.get("qm"), backend="reference")

    plan = [(s, m, d, False) for s in shapes for m in cases.MODES for d in cases.DTYPES]
    plan += [(shapes[0], m, "fp32", True) for m in cases.MODES]
    rows = []
    for shape, mode, dtype_name, masked in plan:
        row = {"backend": backend, "shape": shape.name, "mode": mode, "dtype": dtype_name,
               "masked": masked}
        try:
            x = cases.make_inputs(shape, cases.DTYPES[dtype_name], device, seed=1)
            masks = {"normalize": mode}
            if masked:
                gen = torch.Generator(device=device).manual_seed(2)
                lengths = torch.randint(shape.K // 2, shape.K + 1, (shape.B,), device=device, generator=gen)
                pos = torch.arange(shape.K, device=device)
                masks["kpm"] = pos[None, :] >= lengths[:, None]
                masks["qm"] = pos[None, : shape.T] >= lengths[:, None].clamp(max=shape.T)
            loss, ds, dw, db = _grads(fused, x, masks)
            loss2, ds2, dw2, db2 = _grads(fused, x, masks)
            row["deterministic"] = bool(torch.equal(loss, loss2) and torch.equal(ds, ds2)
                                        and torch.equal(dw, dw2) and torch.equal(db, db2))
            up, ref_loss = reference(x, masks)
            (ref_loss * UPSTREAM).backward()
            ref_ds = torch.cat([s.grad.flatten() for s in up.student])
            row["loss"] = loss.item()
            row["ref_loss"] = ref_loss.item()
            row["err_loss"] = _rel_err(loss, ref_loss)
            row["err_dstudent"] = _rel_err(ds, ref_ds)
            row["err_dweight"] = _rel_err(dw, up.weight.grad)
            # dbias[c] sums dZ = g*(q - p) over every entry: exactly 0 in map mode, and
            # ~0 in row mode when teacher rows sum to 1, so its own norm is no scale.
            # Its error is taken relative to the most that sum can hold, g * 2 per
            # distribution (sum |q - p| <= 2), i.e. relative to the terms summed.
            dists = shape.B * (shape.T if mode == "row" else 1)
            bias_scale = UPSTREAM * 2 * dists * shape.Ct ** 0.5
            row["err_dbias"] = _rel_err(db, up.bias.grad, floor=bias_scale)
            # The same errors of the reference in fp32 (freed before the next case).
            f_loss, f_ds, f_dw, f_db = _grads(reference_fp32, x, masks)
            row["floor_loss"] = _rel_err(f_loss, ref_loss)
            row["floor_dstudent"] = _rel_err(f_ds, ref_ds)
            row["floor_dweight"] = _rel_err(f_dw, up.weight.grad)
            row["floor_dbias"] = _rel_err(f_db, up.bias.grad, floor=bias_scale)
            del f_loss, f_ds, f_dw, f_db
            tol = FP32_TOL if dtype_name == "fp32" else BF16_TOL
            errs = [row[k] for k in ("err_loss", "err_dstudent", "err_dweight", "err_dbias")]
            row["tolerance"] = tol
            row["pass"] = all(e == e and e < tol for e in errs)  # e == e: NaN never passes
            del x, up, ref_loss
        except Exception as exc:
            row["pass"] = False
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        if device.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except RuntimeError:  # the context died with the failure recorded above
                pass
        rows.append(row)
        print(check_line(row), flush=True)
        # Written after every case: a step killed at its timeout keeps what it checked.
        (out_dir / f"check_{backend}.json").write_text(json.dumps(rows, indent=1))
    return rows


def check_line(row: dict) -> str:
    head = (f"{row['backend']:>6} {row['shape']:>5} {row['mode']:>3} {row['dtype']:>4}"
            f"{' masked' if row['masked'] else '       '}")
    if "error" in row:
        return f"{head} FAIL {row['error']}"
    names = ("loss", "dstudent", "dweight", "dbias")
    errs = " ".join(f"{n}={row['err_' + n]:.1e}" for n in names)
    floors = " ".join(f"{row['floor_' + n]:.0e}" for n in names) if "floor_loss" in row else "n/a"
    det = "deterministic" if row.get("deterministic") else "NOT deterministic"
    return f"{head} {'PASS' if row['pass'] else 'FAIL'} (tol {row['tolerance']:g}) {errs} [fp32 ref {floors}] {det}"
