"""Benchmark the A2D loss: eager reference, torch.compile, Triton, CUDA and a peer pipeline.

One command answers "how much faster and leaner is this than what I would write
myself?":

    python benchmarks/bench_a2d.py                 # GPU: the full plan
    python benchmarks/bench_a2d.py --isolate       # same, one process per contender
    python benchmarks/bench_a2d.py --smoke         # CPU: small shapes, reference only

It prints a Markdown table, and writes ``results.json`` (every number, the device,
driver and library versions, the date), ``table.md`` and PNG plots of time and peak
memory versus T under ``--out`` (default ``benchmarks/results/<date>-<device>/``).
Without a CUDA device it switches to the smoke mode by itself and says so.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import cases  # noqa: E402
import contenders as contenders_mod  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402


# ---------------------------------------------------------------- one measurement


def _phase_fns(loss_fn, phase: str):
    """(setup, timed) for a phase; setup is untimed and runs before every timed call."""
    if phase == "forward":
        # Grad-enabled, as in training: the forward builds what the backward needs.
        return None, loss_fn
    if phase == "backward":
        def setup(x):
            x.clear_grads()
            return loss_fn(x)
        return setup, lambda loss: loss.backward()
    if phase == "forward+backward":
        def setup(x):
            x.clear_grads()
            return x
        return setup, lambda x: loss_fn(x).backward()
    raise ValueError(f"phase must be one of {cases.PHASES}, got {phase!r}")


def _error_status(exc: BaseException) -> str:
    if measure.is_oom(exc):
        return "oom"
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {msg}"[:240]


def measure_phase(loss_fn, inputs: List[cases.Inputs], device: torch.device, phase: str,
                  cfg: argparse.Namespace) -> dict:
    """Time and memory of one phase. Never raises: failures become a status."""
    setup, timed = _phase_fns(loss_fn, phase)
    rec: dict = {"status": "ok"}
    try:
        timing = measure.time_call(timed, inputs, device, setup=setup, warmup=cfg.warmup,
                                   reps=cfg.reps, min_reps=cfg.min_reps, target_s=cfg.target_s)
        rec.update(timing.to_dict())
        rec["peak_extra_bytes"] = measure.peak_extra_bytes(timed, inputs[0], device, setup=setup)
        if phase == "forward":
            rec["retained_bytes"] = measure.retained_bytes(loss_fn, inputs[0], device)
    except Exception as exc:  # one failing contender must not end the run
        rec = {"status": _error_status(exc)}
        if not measure.is_oom(exc) and cfg.verbose:
            traceback.print_exc()
    finally:
        for x in inputs:
            x.clear_grads()
        measure.free_memory(device)
    return rec


# ---------------------------------------------------------------- the plan


def plan_shapes(cfg: argparse.Namespace) -> List[Tuple[cases.Shape, bool]]:
    """The shapes to run, each with whether it lies on the T sweep (plotted against T)."""
    if cfg.smoke:
        return [(s, True) for s in cases.smoke_plan()]
    on_sweep = {s.name for s in cases.sweep(tokens=cfg.sweep_tokens, t_max=cfg.sweep_max_t)}
    shapes = cases.full_plan(tokens=cfg.sweep_tokens, t_max=cfg.sweep_max_t)
    if cfg.shapes:
        wanted = set(cfg.shapes.split(","))
        shapes = [s for s in shapes if s.name in wanted or ("sweep" in wanted and s.name in on_sweep)]
    return [(s, s.name in on_sweep) for s in shapes]


def run(cfg: argparse.Namespace, out_dir: Path) -> dict:
    """Run every (shape, mode, dtype, contender, phase) in ``cfg``; return the results."""
    device = torch.device(cfg.device)
    started = time.time()
    deadline = started + cfg.budget_s if cfg.budget_s is not None else None
    meta = {
        **measure.device_summary(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "run_mode": "cpu-smoke" if cfg.smoke else "gpu",
        "reduction": "sum",
        "config": {k: v for k, v in vars(cfg).items() if k not in ("out",)},
    }
    try:
        meta["copy_bytes_per_s"] = measure.copy_bandwidth(device)
    except Exception as exc:  # without it only the x floor column is lost
        meta["copy_bytes_per_s"] = None
        meta["copy_bandwidth_error"] = _error_status(exc)

    chosen = contenders_mod.select(cfg.contenders.split(","))
    skipped: Dict[str, str] = {}
    active = []
    for c in chosen:
        try:
            why = c.unavailable_reason(device)
        except Exception as exc:  # a broken backend import must not end the run
            why = f"availability check failed: {_error_status(exc)}"
        if why == contenders_mod.NO_CUDA and cfg.force:
            why = None
        if why is None:
            active.append(c)
        else:
            skipped[c.name] = why
    meta["contenders"] = {c.name: c.description for c in chosen}
    meta["skipped_contenders"] = skipped

    records: List[dict] = []
    results = {"meta": meta, "records": records}
    modes = cfg.modes.split(",")
    dtypes = cfg.dtypes.split(",")
    phases = [p for p in cases.PHASES if p in cfg.phases.split(",")]
    builds: Dict = {}

    for shape, on_sweep in (plan_shapes(cfg) if active else []):
        for mode in modes:
            for dtype_name in dtypes:
                dtype = cases.DTYPES[dtype_name]
                base = {"shape": shape.to_dict(), "sweep": on_sweep,
                        "mode": mode, "dtype": dtype_name}
                if deadline is not None and time.time() > deadline:
                    for c in active:
                        records.extend({**base, "contender": c.name, "phase": p,
                                        "status": "skipped: time budget"} for p in phases)
                    continue
                try:
                    n_sets = measure.rotation_count(cases.input_bytes(shape, dtype), device)
                    inputs = [cases.make_inputs(shape, dtype, device, seed=i) for i in range(n_sets)]
                except Exception as exc:
                    status = _error_status(exc)
                    for c in active:
                        records.extend({**base, "contender": c.name, "phase": p,
                                        "status": f"inputs: {status}"} for p in phases)
                    measure.free_memory(device)
                    continue
                for c in active:
                    key = (c.name, mode)
                    try:
                        if key not in builds:
                            builds[key] = c.build(mode)
                        loss_fn = builds[key]
                    except Exception as exc:
                        records.extend({**base, "contender": c.name, "phase": p,
                                        "status": f"build: {_error_status(exc)}"} for p in phases)
                        continue
                    for phase in phases:
                        rec = {**base, "contender": c.name, "phase": phase,
                               "floor_bytes": cases.floor_bytes(shape, dtype, phase),
                               "gradient_bytes": cases.gradient_bytes(shape, dtype, phase)}
                        rec.update(measure_phase(loss_fn, inputs, device, phase, cfg))
                        records.append(rec)
                        if not cfg.quiet:
                            print(_progress(rec), flush=True)
                    _write_json(results, out_dir)  # partial results survive a crash
                del inputs
                measure.free_memory(device)
    meta["elapsed_s"] = time.time() - started
    return results


def _progress(rec: dict) -> str:
    s = rec["shape"]
    t = f"{rec['median_ms']:.3f} ms" if rec["status"] == "ok" else rec["status"]
    return f"  {s['name']:>12} {rec['mode']:>3} {rec['dtype']:>4} {rec['phase']:>16} {rec['contender']:>8}: {t}"


# ---------------------------------------------------------------- one process per contender


def run_isolated(cfg: argparse.Namespace, argv: List[str], out_dir: Path) -> dict:
    """Run each contender in its own process and merge the results.

    A kernel that faults poisons its CUDA context for everything after it in the
    same process; in its own process it costs only its own rows.
    """
    names = cfg.contenders.split(",")
    # compiled spends its first calls compiling (one graph per mode, dtype and
    # phase): it gets a larger share of the budget.
    weights = {n: (2.5 if n == "compiled" else 1.0) for n in names}
    deadline = time.time() + cfg.budget_s if cfg.budget_s is not None else None
    parts = []
    for i, name in enumerate(names):
        part_dir = out_dir / "parts" / name
        part_dir.mkdir(parents=True, exist_ok=True)
        args = _strip_args(argv, {"--contenders", "--out", "--budget-s"}, {"--isolate", "--no-plots"})
        args += ["--contenders", name, "--out", str(part_dir), "--no-plots", "--table", "none",
                 "--quiet", "--verbose"]
        timeout = None
        if deadline is not None:
            # Shares are recomputed as contenders finish: one that is unavailable
            # exits at once and leaves its time to the others.
            left = max(0.0, deadline - time.time())
            share = left * weights[name] / sum(weights[n] for n in names[i:])
            if share < 5:
                parts.append((name, None, "skipped: time budget spent before it started"))
                continue
            args += ["--budget-s", f"{share:.0f}"]
            timeout = share + 60  # the case running at the budget's end may finish
        cmd = [sys.executable, str(Path(__file__).resolve()), *args]
        print(f"[isolate] {name}: {' '.join(cmd[1:])}", flush=True)
        status = None
        log = part_dir / "log.txt"  # the child's output, tracebacks included
        try:
            proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
            log.write_text(proc.stdout + proc.stderr)
            tail = (proc.stdout + proc.stderr)[-1500:]
            if proc.returncode != 0:
                last = tail.strip().splitlines()[-1] if tail.strip() else ""
                status = f"error: process exited with {proc.returncode}: {last}"[:240]
                print(f"[isolate] {name} failed (rc={proc.returncode}), log {log}:\n{tail}", flush=True)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            log.write_bytes(out if isinstance(out, bytes) else out.encode())
            status = f"error: process timed out after {timeout:.0f}s"
            print(f"[isolate] {name}: {status}", flush=True)
        part_file = part_dir / "results.json"
        part = json.loads(part_file.read_text()) if part_file.exists() else None
        parts.append((name, part, status))
    return merge_parts(parts)


def merge_parts(parts) -> dict:
    """Merge per-contender results; a contender whose process died is recorded so."""
    meta: Optional[dict] = None
    records: List[dict] = []
    skipped: Dict[str, str] = {}
    descriptions: Dict[str, str] = {}
    copy_bw = []
    for name, part, status in parts:
        if part is None:
            skipped[name] = status or "error: no results written"
            continue
        if meta is None:
            meta = dict(part["meta"])
        copy_bw.append(part["meta"].get("copy_bytes_per_s"))
        skipped.update(part["meta"].get("skipped_contenders", {}))
        descriptions.update(part["meta"].get("contenders", {}))
        records.extend(part["records"])
        if status is not None:
            skipped[f"{name} (partial)"] = status
    meta = meta or {}
    bws = sorted(b for b in copy_bw if b)
    if bws:
        meta["copy_bytes_per_s"] = bws[len(bws) // 2]
        meta["copy_bytes_per_s_per_process"] = bws
    meta["skipped_contenders"] = skipped
    meta["contenders"] = descriptions
    meta["isolated"] = True
    return {"meta": meta, "records": records}


def _strip_args(argv: List[str], with_value: set, flags: set) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            continue
        if a in with_value:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in with_value):
            continue
        out.append(a)
    return out


# ---------------------------------------------------------------- output


def _write_json(results: dict, out_dir: Path) -> Path:
    from a2d_trainer.atomic import write_text

    path = out_dir / "results.json"
    write_text(path, json.dumps(results, indent=1, default=str))
    return path


def default_out_dir(device: torch.device, smoke: bool) -> Path:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu-smoke" if smoke else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return HERE / "results" / f"{date}-{slug}"


def finish(results: dict, out_dir: Path, cfg: argparse.Namespace) -> dict:
    """Derive ratios, write JSON + table + plots, print the table and the notes."""
    meta = results["meta"]
    results["records"] = report.derive(results["records"], meta.get("copy_bytes_per_s"))
    _write_json(results, out_dir)
    table = report.markdown_table(results["records"])
    (out_dir / "table.md").write_text(_header(meta) + "\n\n" + table + "\n")
    if not cfg.no_plots:
        try:
            import plot

            for path in plot.plot_results(results, out_dir):
                print(f"plot: {path}")
        except Exception as exc:  # plots are a convenience; the numbers are in the JSON
            print(f"plots not written: {type(exc).__name__}: {exc}")
    if cfg.table == "full":
        print(table)
    elif cfg.table == "summary":
        realistic = [r for r in results["records"] if r["shape"]["name"] in ("iwslt", "wmt", "long")]
        print(report.compact_summary(realistic or results["records"]))
    print()
    print(_header(meta))
    for line in report.target_lines(results["records"]):
        print("target:", line)
    print(f"results: {out_dir / 'results.json'}  table: {out_dir / 'table.md'}")
    return results


def _header(meta: dict) -> str:
    bw = meta.get("copy_bytes_per_s")
    lines = [
        f"device: {meta.get('device_name')} | driver {meta.get('driver')} | torch {meta.get('torch')} "
        f"| triton {meta.get('triton')} | CUDA {meta.get('cuda_runtime')} | {meta.get('date')}",
        f"copy bandwidth measured in this run: {bw / 1e9:.0f} GB/s" if bw else "copy bandwidth: not measured",
    ]
    if meta.get("run_mode") == "cpu-smoke":
        lines.append("CPU smoke mode (no CUDA device): small shapes, eager reference only; "
                     "these are CPU numbers, not GPU results.")
    for name, why in meta.get("skipped_contenders", {}).items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--smoke", action="store_true",
                   help="small shapes, eager only, few repeats (automatic without CUDA)")
    p.add_argument("--contenders", default=",".join(contenders_mod.CONTENDER_NAMES),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--shapes", default=None,
                   help="comma-separated shape names to keep (iwslt,wmt,long,sweep); default all")
    p.add_argument("--modes", default="map,row")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--phases", default=",".join(cases.PHASES))
    p.add_argument("--sweep-tokens", type=int, default=4096, help="B*T held fixed in the T sweep")
    p.add_argument("--sweep-max-t", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50, help="timed repeats (fewer if one call is slow)")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--target-s", type=float, default=1.0,
                   help="time one measurement may take; lowers --reps for slow calls")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new cases after this many seconds (recorded as skipped)")
    p.add_argument("--isolate", action="store_true", help="one process per contender")
    p.add_argument("--force", action="store_true",
                   help="run the selected contenders on the CPU too (debugging the benchmark; slow)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<date>-<device>/)")
    p.add_argument("--table", choices=("full", "summary", "none"), default="full",
                   help="stdout: every row, a compact forward+backward summary, or none")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no per-measurement progress lines")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing contenders")
    return p


def configure(argv: Optional[List[str]] = None) -> argparse.Namespace:
    cfg = build_parser().parse_args(argv)
    if cfg.device is None:
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(cfg.device).type != "cuda" and not cfg.smoke:
        print("No CUDA device: running the CPU smoke mode (small shapes, eager reference only). "
              + ("--force: the selected GPU contenders run on the CPU anyway (not GPU numbers)."
                 if cfg.force else "GPU contenders (compiled, triton, cuda, peer) are skipped."),
              flush=True)
        cfg.smoke = True
    if cfg.smoke:
        cfg.warmup = min(cfg.warmup, 1)
        cfg.reps = min(cfg.reps, 5)
        cfg.min_reps = min(cfg.min_reps, 3)
        cfg.target_s = min(cfg.target_s, 0.2)
    for name, value, allowed in (("--modes", cfg.modes, cases.MODES), ("--dtypes", cfg.dtypes, cases.DTYPES),
                                 ("--phases", cfg.phases, cases.PHASES)):
        bad = [v for v in value.split(",") if v not in allowed]
        if bad:
            raise SystemExit(f"{name} got {bad}; allowed: {list(allowed)}")
    return cfg


def main(argv: Optional[List[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = configure(argv)
    device = torch.device(cfg.device)
    out_dir = Path(cfg.out) if cfg.out else default_out_dir(device, cfg.smoke)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if cfg.smoke:
        # The smoke mode checks that the command works, not how fast a CPU is; one
        # thread keeps it quick and steady on a busy shared CI machine, where
        # oversubscribed intra-op threads make tiny ops 10x slower.
        torch.set_num_threads(1)
    try:
        if cfg.isolate:
            results = run_isolated(cfg, argv, out_dir)
            results["meta"]["command"] = " ".join([Path(sys.argv[0]).name, *argv])
            results["meta"]["config"] = {k: v for k, v in vars(cfg).items() if k != "out"}
        else:
            results = run(cfg, out_dir)
        results["meta"]["cpu_threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    return finish(results, out_dir, cfg)


if __name__ == "__main__":
    main()
