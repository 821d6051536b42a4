"""QK mode against the map path as T grows, next to the model's own attention (SDPA).

    python benchmarks/bench_qk.py                      # GPU: T = 512 ... 65536, bf16
    python benchmarks/bench_qk.py --t-max 16384 --dtype fp32
    python benchmarks/bench_qk.py --smoke              # CPU: tiny T, reference backends
    TRITON_INTERPRET=1 python benchmarks/bench_qk.py --smoke --backend triton   # CPU, the kernels

Per T (batch 1; student 3 layers x 4 heads, teacher 6 x 4, head dim 64), forward +
backward of:

``qk``    ``a2d_kl_qk(q, k, ...)``: the loss from queries and keys, nothing T*K-sized
          in memory (``--backend``: Triton by default; the reference in ``--smoke``).
``map``   what a model must do to use the map-mode loss: materialize the probability
          maps ``softmax(q k^T * scale)`` of both models (as eager attention does, in the
          input dtype), then ``a2d_kl`` on them (the fused Triton kernel), gradients
          back to the student's q and k through the maps.
``sdpa``  the model's own attention for the same heads, for scale: student
          ``scaled_dot_product_attention`` forward + backward, teacher forward.

Time (median, p20/p80 of CUDA-event timings, ``measure.time_call``) and peak memory
above the inputs; an out-of-memory is recorded as ``oom`` and the contender is not run
at larger T, nor after a call slower than ``--slow-s``, nor when its next measurement
would not fit in ``--budget-s``. Up to ``--check-t-max``, each loss (``qk``, ``map``) is
also computed from fp32 copies of the inputs and compared with the float64 reference
(``check``: relative error, next to the fp32 floor, the reference's own error in fp32;
pass within 10x of it). Output: table on stdout,
``qk_results.json`` (every number, device, versions, date) and ``qk_table.md``, both
rewritten after every measurement, and ``qk_sweep.png`` at the end, under ``--out``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import measure  # noqa: E402

CONTENDERS = ("qk", "map", "sdpa")
CALLS_PER_MEASUREMENT = 9  # first call, warm-up, repeats, the memory call, the check
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MiB = 1024 * 1024


def make_inputs(T: int, Cs: int, Ct: int, D: int, B: int, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """Queries, keys and values of both models and the mixer, as an attention layer has them."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def heads(C, grad=False):
        t = torch.randn(B, C, T, D, generator=g).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    return {"sq": heads(Cs, True), "sk": heads(Cs, True), "sv": heads(Cs, True),
            "tq": heads(Ct), "tk": heads(Ct), "tv": heads(Ct),
            "weight": (torch.randn(Ct, Cs, generator=g) / math.sqrt(Cs)).to(device).requires_grad_(),
            "bias": torch.zeros(Ct, device=device).requires_grad_()}


def qk_loss(backend: str) -> Callable[[dict], torch.Tensor]:
    from a2d_kernels import a2d_kl_qk

    return lambda x: a2d_kl_qk(x["sq"], x["sk"], x["tq"], x["tk"], x["weight"], x["bias"], backend=backend)


def map_loss(backend: str) -> Callable[[dict], torch.Tensor]:
    from a2d_kernels import a2d_kl

    def probs(q, k):
        return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)

    def run(x):
        student = probs(x["sq"], x["sk"])
        with torch.no_grad():
            teacher = probs(x["tq"], x["tk"])
        return a2d_kl(student, teacher, x["weight"], x["bias"], backend=backend)

    return run


def loss_step(loss_fn) -> Callable[[dict], tuple]:
    """Forward + backward into the student's q, k and the mixer (no .grad accumulation)."""
    def run(x):
        loss = loss_fn(x)
        return torch.autograd.grad(loss, [x["sq"], x["sk"], x["weight"], x["bias"]])
    return run


def sdpa_step(x) -> tuple:
    out = F.scaled_dot_product_attention(x["sq"], x["sk"], x["sv"])
    with torch.no_grad():
        F.scaled_dot_product_attention(x["tq"], x["tk"], x["tv"])
    return torch.autograd.grad(out, [x["sq"], x["sk"], x["sv"]], torch.ones_like(out))


def contender_steps(backend: str) -> Dict[str, Callable]:
    return {"qk": loss_step(qk_loss(backend)), "map": loss_step(map_loss(backend)), "sdpa": sdpa_step}


def unavailable(device: torch.device, backend: str) -> Optional[str]:
    if backend != "reference" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the Triton kernels need a CUDA device, got {device}; use --smoke on the CPU"
    return None


def reference_losses(x: dict) -> Tuple[float, float]:
    """``(float64, fp32)`` losses of the reference (``a2d_kl_qk``'s oracle) on copies of
    ``x``: the truth the checks compare with, and the fp32 floor."""
    from a2d_kernels import a2d_kl_qk

    def loss(dtype):
        c = {k: v.detach().to(dtype) for k, v in x.items()}
        return float(a2d_kl_qk(c["sq"], c["sk"], c["tq"], c["tk"], c["weight"], c["bias"], backend="reference"))

    with torch.no_grad():
        return loss(torch.float64), loss(torch.float32)


def check_loss(name: str, backend: str, x: dict, reference: Tuple[float, float]) -> dict:
    """The contender's loss computed from fp32 copies of ``x`` against the float64
    reference (``reference_losses``): its relative error, and the fp32 floor, the
    relative error of the reference itself run in fp32. A map-mode loss is a small sum
    of KL terms of near-uniform distributions, so the floor is far above fp32's epsilon
    and grows with T; the check passes within 10x of it."""
    fn = qk_loss(backend) if name == "qk" else map_loss(backend)
    with torch.no_grad():
        got = float(fn({k: v.detach().float() for k, v in x.items()}))
    want, floor = reference
    scale = max(abs(want), 1e-30)
    err, floor_err = abs(got - want) / scale, abs(floor - want) / scale
    return {"check_rel_err": err, "check_floor": floor_err, "check_pass": err <= max(10 * floor_err, 1e-6)}


def run_sweep(args, device: torch.device, on_record: Optional[Callable[[dict], None]] = None) -> dict:
    """Every contender at every T, small T first. A contender is dropped for larger T after
    an OOM, an error, a call slower than ``--slow-s``, or when its next measurement (about
    4x its last, T doubling) would not end inside ``--budget-s``. ``on_record(result)``
    is called after every measurement, so a run cut short leaves its results."""
    dtype = DTYPES[args.dtype]
    steps = contender_steps(args.backend)
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device": measure.device_summary(device), "smoke": args.smoke, "backend": args.backend,
              "records": [], "largest_T": {}}
    records = result["records"]
    stopped: Dict[str, str] = {}  # contender -> why it is not run at larger T
    last_s: Dict[str, float] = {}  # contender -> seconds per call at the previous T
    start = time.monotonic()
    for T in [t for t in args.t_values if t <= args.t_max]:
        x = reference = None  # built once per T: every contender gets the same inputs
        for name in args.contenders:
            rec = {"contender": name, "T": T, "B": args.batch, "Cs": args.cs, "Ct": args.ct, "D": args.head_dim,
                   "dtype": args.dtype}
            left = args.budget_s - (time.monotonic() - start)
            if name not in stopped and name in last_s and 4 * last_s[name] * CALLS_PER_MEASUREMENT > left:
                stopped[name] = "budget"
            if name in stopped or left <= 0:
                rec["status"] = f"skipped ({stopped.get(name, 'budget')})"
            else:
                try:
                    if x is None:
                        x = make_inputs(T, args.cs, args.ct, args.head_dim, args.batch, dtype, device)
                    if name != "sdpa" and T <= args.check_t_max:
                        if reference is None:
                            reference = reference_losses(x)
                        rec.update(check_loss(name, args.backend, x, reference))
                    timing = measure.time_call(steps[name], [x], device, warmup=args.warmup, reps=args.reps,
                                               min_reps=3, target_s=args.target_s)
                    peak = measure.peak_extra_bytes(steps[name], x, device)
                    rec.update(status="ok", **timing.to_dict(), peak_extra_bytes=peak)
                    last_s[name] = timing.median_ms / 1e3
                    if last_s[name] > args.slow_s:
                        stopped[name] = f"{last_s[name]:.1f} s per call at T={T}"
                except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
                    oom = measure.is_oom(exc)
                    rec["status"] = "oom" if oom else f"error: {type(exc).__name__}: {str(exc)[:300]}"
                    stopped[name] = f"{'oom' if oom else 'error'} at T={T}"
                finally:
                    measure.free_memory(device)
            records.append(rec)
            result["largest_T"] = largest_t(records)
            print(_line(rec), flush=True)
            if on_record is not None:
                on_record(result)
        del x
        measure.free_memory(device)
    return result


def largest_t(records: List[dict]) -> Dict[str, Optional[int]]:
    """Per contender, the largest T that ran (None: none did)."""
    out: Dict[str, Optional[int]] = {}
    for r in records:
        out.setdefault(r["contender"], None)
        if r["status"] == "ok":
            out[r["contender"]] = max(out[r["contender"]] or 0, r["T"])
    return out


def _line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['contender']:>5} T={r['T']:>6}: {r['status']}"
    peak = r.get("peak_extra_bytes")
    return (f"{r['contender']:>5} T={r['T']:>6}: {r['median_ms']:10.3f} ms"
            + (f", peak +{peak / MiB:,.0f} MiB" if peak is not None else ""))


def markdown_table(result: dict) -> str:
    """One row per T: time and peak extra memory of each contender, and the ratios that
    matter (map / qk, qk / sdpa)."""
    by_t: Dict[int, Dict[str, dict]] = {}
    for r in result["records"]:
        by_t.setdefault(r["T"], {})[r["contender"]] = r
    names = [n for n in CONTENDERS if any(n in row for row in by_t.values())]

    def cell(r: Optional[dict]) -> str:
        if r is None:
            return "-"
        if r["status"] != "ok":
            return r["status"].split(" (")[0] if r["status"].startswith("skipped") else r["status"][:40]
        peak = r.get("peak_extra_bytes")
        return f"{r['median_ms']:.3f} ms" + (f" / {peak / MiB:,.0f} MiB" if peak is not None else "")

    def ratio(a: Optional[dict], b: Optional[dict]) -> str:
        ok = a is not None and b is not None and a["status"] == b["status"] == "ok"
        return f"{a['median_ms'] / b['median_ms']:.2f}x" if ok else "-"

    def check(r: Optional[dict]) -> str:
        if r is None or "check_rel_err" not in r:
            return "-"
        return f"{r['check_rel_err']:.1e} (floor {r['check_floor']:.0e})" + ("" if r["check_pass"] else " FAIL")

    rows = ["| T | " + " | ".join(f"{n} (time / peak extra)" for n in names) + " | map / qk time | qk / sdpa time "
            "| check qk / map (fp32 vs fp64) |", "|---:|" + "---:|" * (len(names) + 3)]
    for T in sorted(by_t):
        row = by_t[T]
        rows.append(f"| {T} | " + " | ".join(cell(row.get(n)) for n in names)
                    + f" | {ratio(row.get('map'), row.get('qk'))} | {ratio(row.get('qk'), row.get('sdpa'))} | "
                    + f"{check(row.get('qk'))} / {check(row.get('map'))} |")
    largest = ", ".join(f"{n}: {t if t is not None else 'none'}" for n, t in result["largest_T"].items())
    return "\n".join(rows + ["", f"Largest T that ran: {largest}."])


def plot(result: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name in CONTENDERS:
        ok = [r for r in result["records"] if r["contender"] == name and r["status"] == "ok"]
        if not ok:
            continue
        ax_t.plot([r["T"] for r in ok], [r["median_ms"] for r in ok], marker="o", label=name)
        mem = [r for r in ok if r.get("peak_extra_bytes") is not None]
        if mem:
            ax_m.plot([r["T"] for r in mem], [max(r["peak_extra_bytes"], 1) / MiB for r in mem], marker="o", label=name)
    for ax, what in ((ax_t, "forward+backward time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T = K")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(f"A2D loss, QK mode vs maps ({result['device'].get('device_name')}, "
                 f"{result['records'][0]['dtype'] if result['records'] else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<date>-<device>-qk)")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny T, reference backends (checks this script)")
    p.add_argument("--backend", default=None, choices=["triton", "reference"],
                   help="loss backend of qk and map (default: triton; reference with --smoke)")
    p.add_argument("--check-t-max", type=int, default=1024, help="largest T checked against float64")
    p.add_argument("--t-max", type=int, default=65536)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cs", type=int, default=12, help="student channels (3 layers x 4 heads)")
    p.add_argument("--ct", type=int, default=24, help="teacher channels (6 layers x 4 heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--target-s", type=float, default=0.5, help="time the repeats of one measurement may take")
    p.add_argument("--slow-s", type=float, default=5.0, help="no larger T after a call slower than this")
    p.add_argument("--budget-s", type=float, default=1e9, help="no new measurement after this many seconds")
    args = p.parse_args(argv)
    args.contenders = [c for c in args.contenders.split(",") if c]
    bad = [c for c in args.contenders if c not in CONTENDERS]
    if bad:
        p.error(f"--contenders: unknown {bad}; choose from {', '.join(CONTENDERS)}")
    if args.backend is None:
        args.backend = "reference" if args.smoke else "triton"
    if args.smoke:
        args.t_values, args.t_max, args.head_dim, args.dtype = [8, 16, 32], min(args.t_max, 32), 16, "fp32"
        args.cs, args.ct, args.warmup, args.reps, args.target_s = 4, 6, 1, 3, 0.05
    else:
        args.t_values = [2 ** i for i in range(9, 17)]  # 512 ... 65536
    return args


def write_outputs(result: dict, out: Path) -> str:
    """``qk_results.json`` and ``qk_table.md`` (whole files replaced, never half written)."""
    from a2d_trainer.atomic import write_text

    table = markdown_table(result)
    write_text(out / "qk_results.json", json.dumps(result, indent=1) + "\n")
    write_text(out / "qk_table.md", table + "\n")
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    why = unavailable(device, args.backend)
    if why:
        print(f"bench_qk: {why}")
        return 2
    name = measure.device_summary(device).get("device_name", "cpu").replace(" ", "-")
    out = Path(args.out) if args.out else HERE / "results" / f"{_dt.date.today():%Y-%m-%d}-{name}-qk"
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(vars(args))

    def save(result: dict) -> None:
        write_outputs({**result, "args": settings}, out)

    result = run_sweep(args, device, on_record=save)
    table = write_outputs({**result, "args": settings}, out)
    png = plot(result, out / "qk_sweep.png")
    print("\n" + table)
    print(f"\nbench_qk: wrote {out / 'qk_results.json'}, {out / 'qk_table.md'}" + (f", {png}" if png else ""))
    failed = [r for r in result["records"] if r.get("check_pass") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
