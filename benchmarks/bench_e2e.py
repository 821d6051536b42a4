"""End to end: one distillation training step, and the A2D loss's share of it.

    python benchmarks/bench_e2e.py                  # GPU: release-sized models
    python benchmarks/bench_e2e.py --smoke          # CPU: tiny models, reference only

The step is what the trainer does per batch: the teacher (6+6 layers, 4 heads,
d=512, frozen, eval mode) runs without gradients, the student (3+3) runs, and the
loss is label-smoothed cross-entropy + word-level KD + the A2D attention term over
encoder self-, decoder self- and decoder cross-attention (``A2DDistiller``, the
release's weighting); then backward and an Adam step. The CE and KD terms are
written inline here (standard formulas): the benchmark is about the attention term.

Variants: ``baseline`` (the same step without the attention term and without
returning maps) and ``a2d:<backend>`` for each available backend. The A2D share of
step time is ``(t_a2d - t_baseline) / t_a2d``, likewise for peak memory above the
models and optimizer state.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import measure  # noqa: E402

MiB = 1024 * 1024


def _import_trainer():
    from a2d_kernels.distill import A2DDistiller
    from a2d_trainer.model import build_model

    return build_model, A2DDistiller


class DistillStep:
    """One training step of a student against a frozen teacher, with or without A2D."""

    def __init__(self, teacher, student, distiller, batch, alpha: float = 0.5, smoothing: float = 0.1,
                 amp: Optional[torch.dtype] = None):
        self.teacher, self.student, self.distiller = teacher, student, distiller
        self.src, self.tgt_in, self.tgt_out = batch
        self.alpha, self.smoothing, self.amp = alpha, smoothing, amp
        params = list(student.parameters()) + (list(distiller.parameters()) if distiller is not None else [])
        self.params = params
        self.optimizer = torch.optim.Adam(params, lr=1e-4)

    def zero_grad(self, _=None):
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, _=None) -> torch.Tensor:
        need_attn = self.distiller is not None
        device_type = self.src.device.type
        amp = torch.autocast(device_type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()
        with amp:
            with torch.no_grad():
                t_logits, t_attn = self.teacher(self.src, self.tgt_in, need_attn=need_attn)
            s_logits, s_attn = self.student(self.src, self.tgt_in, need_attn=need_attn)
            V = s_logits.size(-1)
            ce = F.cross_entropy(s_logits.reshape(-1, V).float(), self.tgt_out.reshape(-1),
                                 label_smoothing=self.smoothing)
            kd = F.kl_div(F.log_softmax(s_logits.float(), -1).reshape(-1, V),
                          F.softmax(t_logits.float(), -1).reshape(-1, V), reduction="batchmean")
            loss = (1 - self.alpha) * ce + self.alpha * kd
        if need_attn:
            # The attention term sees the maps as the model produced them: bf16 under
            # --amp bf16 (the model's fp32 softmax is cast back to the scores' dtype).
            loss = loss + self.distiller(s_attn, t_attn, epoch=1).total
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def run(cfg: argparse.Namespace) -> dict:
    build_model, A2DDistiller = _import_trainer()
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, cfg.vocab).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_model(cfg.student, cfg.vocab).to(device).train()
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.randint(1, cfg.vocab, (cfg.batch, cfg.src_len), device=device, generator=gen)
    tgt = torch.randint(1, cfg.vocab, (cfg.batch, cfg.tgt_len + 1), device=device, generator=gen)
    batch = (src, tgt[:, :-1], tgt[:, 1:])
    amp = {"none": None, "bf16": torch.bfloat16}[cfg.amp]

    from a2d_kernels import backends as available

    status = available(device)
    variants: List[tuple] = [("baseline", None)]
    skipped: Dict[str, str] = {}
    for name in cfg.backends.split(","):
        info = status.get(name)
        if info is None:
            skipped[name] = "unknown backend"
        elif not info["available"]:
            skipped[name] = info["reason"]
        elif device.type != "cuda" and name != "reference":
            skipped[name] = "GPU backend skipped: no CUDA device (CPU smoke mode)"
        else:
            variants.append((f"a2d:{name}", name))

    started = time.time()
    rows = []
    for label, backend in variants:
        row = {"variant": label}
        if cfg.budget_s is not None and time.time() - started > cfg.budget_s:
            row["status"] = "skipped: time budget"
            rows.append(row)
            continue
        try:
            distiller = None
            if backend is not None:
                distiller = A2DDistiller(student.config.heads_per_kind(), teacher.config.heads_per_kind(),
                                         normalize=cfg.normalize, backend=backend).to(device)
            step = DistillStep(teacher, student, distiller, batch, amp=amp)
            timing = measure.time_call(step, [None], device, setup=step.zero_grad, warmup=cfg.warmup,
                                       reps=cfg.reps, min_reps=3, target_s=cfg.target_s)
            row.update(timing.to_dict())
            row["peak_extra_bytes"] = measure.peak_extra_bytes(step, None, device, setup=step.zero_grad)
            row["status"] = "ok"
            del step, distiller
        except Exception as exc:
            row["status"] = "oom" if measure.is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:240]
        measure.free_memory(device)
        rows.append(row)
        print(f"  {label}: {row.get('median_ms', float('nan')):.2f} ms ({row['status']})", flush=True)

    base = rows[0] if rows and rows[0].get("status") == "ok" else None
    for row in rows[1:]:
        if base and row.get("status") == "ok":
            row["a2d_ms"] = row["median_ms"] - base["median_ms"]
            row["a2d_time_share"] = row["a2d_ms"] / row["median_ms"]
            if row.get("peak_extra_bytes") and base.get("peak_extra_bytes") is not None:
                row["a2d_peak_share"] = (row["peak_extra_bytes"] - base["peak_extra_bytes"]) / row["peak_extra_bytes"]
    meta = {
        **measure.device_summary(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_mode": "cpu-smoke" if device.type != "cuda" else "gpu",
        "config": vars(cfg),
        "skipped_backends": skipped,
        "parameters": {"teacher": sum(p.numel() for p in teacher.parameters()),
                       "student": sum(p.numel() for p in student.parameters())},
    }
    return {"meta": meta, "rows": rows}


def markdown(results: dict) -> str:
    lines = ["| variant | step median ms | p20-p80 ms | A2D ms | A2D share of step | "
             "peak above state MiB | A2D share of peak | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        ok = r.get("status") == "ok"

        def f(key, spec, scale=1.0):
            v = r.get(key)
            return "-" if v is None or not ok else format(v * scale, spec)
        spread = f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}" if ok else "-"
        lines.append(f"| {r['variant']} | {f('median_ms', '.2f')} | {spread} | {f('a2d_ms', '.2f')} "
                     f"| {f('a2d_time_share', '.1%')} | {f('peak_extra_bytes', '.0f', 1 / MiB)} "
                     f"| {f('a2d_peak_share', '.1%')} | {r.get('status')} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny presets and batch (automatic without CUDA)")
    p.add_argument("--teacher", default="teacher")
    p.add_argument("--student", default="student")
    p.add_argument("--backends", default="reference,triton,cuda")
    p.add_argument("--normalize", default="map", choices=("map", "row"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--src-len", type=int, default=64)
    p.add_argument("--tgt-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=10000, help="shared vocabulary (IWSLT'14 sentencepiece-sized)")
    p.add_argument("--amp", default="none", choices=("none", "bf16"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--target-s", type=float, default=3.0)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--out", default=None)
    return p


def main(argv: Optional[List[str]] = None) -> dict:
    cfg = build_parser().parse_args(argv)
    if cfg.device is None:
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(cfg.device).type != "cuda" and not cfg.smoke:
        print("No CUDA device: CPU smoke mode (tiny models, small batch, reference backend only); "
              "GPU backends are skipped and these are not GPU numbers.", flush=True)
        cfg.smoke = True
    if cfg.smoke:
        cfg.teacher, cfg.student = "tiny-teacher", "tiny-student"
        cfg.batch, cfg.src_len, cfg.tgt_len, cfg.vocab = 4, 12, 10, 256
        cfg.warmup, cfg.reps, cfg.target_s = 1, 3, 0.5
    threads = torch.get_num_threads()
    if cfg.smoke:
        torch.set_num_threads(1)  # see bench_a2d.main: steady on a busy shared CPU
    try:
        results = run(cfg)
    finally:
        torch.set_num_threads(threads)
    table = markdown(results)
    print(table)
    m = results["meta"]
    print(f"device: {m.get('device_name')} | torch {m.get('torch')} | {m.get('date')} | "
          f"teacher {cfg.teacher} ({m['parameters']['teacher'] / 1e6:.1f}M), "
          f"student {cfg.student} ({m['parameters']['student'] / 1e6:.1f}M), batch {cfg.batch}x{cfg.src_len}/{cfg.tgt_len}")
    for name, why in m["skipped_backends"].items():
        print(f"skipped {name}: {why}")
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "e2e.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "e2e.md").write_text(table + "\n")
        print(f"results: {out / 'e2e.json'}")
    return results


if __name__ == "__main__":
    main()
