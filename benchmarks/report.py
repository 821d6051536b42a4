"""Turn raw benchmark records into derived numbers, Markdown tables and target checks.

A record (one contender, shape, mode, dtype, phase) holds only what was measured:
times, peak bytes, the byte floor and a status. Ratios are derived here, from the
records and the copy bandwidth measured in the same run, so merged partial runs
(one process per contender) get the same treatment as a single run.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

MiB = 1024 * 1024

# The issue's targets for the fused kernels (GPU, forward+backward).
TARGET_SPEEDUP_EAGER = 8.0
TARGET_SPEEDUP_COMPILED = 3.0
TARGET_X_FLOOR = 1.3
TARGET_MEMORY_SAVING = 0.95
FUSED = ("triton", "cuda")


def case_key(r: dict) -> Tuple:
    return (r["shape"]["name"], r["mode"], r["dtype"], r["phase"])


def derive(records: List[dict], copy_bytes_per_s: Optional[float]) -> List[dict]:
    """Add to every ok record: speedups vs eager and compiled, GB/s, x floor, memory ratio."""
    by_case: Dict[Tuple, Dict[str, dict]] = {}
    for r in records:
        by_case.setdefault(case_key(r), {})[r["contender"]] = r
    out = []
    for r in records:
        r = dict(r)
        if r.get("status") == "ok":
            peers = by_case[case_key(r)]
            ms = r["median_ms"]
            for base in ("eager", "compiled"):
                b = peers.get(base)
                r[f"x_{base}"] = (b["median_ms"] / ms) if b and b.get("status") == "ok" and ms > 0 else None
            r["achieved_gbps"] = r["floor_bytes"] / (ms * 1e-3) / 1e9 if ms > 0 else None
            if copy_bytes_per_s and ms > 0:
                floor_ms = r["floor_bytes"] / copy_bytes_per_s * 1e3
                r["floor_ms"] = floor_ms
                r["x_floor"] = ms / floor_ms
            eager = peers.get("eager")
            if (eager and eager.get("status") == "ok" and eager.get("peak_extra_bytes")
                    and r.get("peak_extra_bytes") is not None):
                r["memory_vs_eager"] = r["peak_extra_bytes"] / eager["peak_extra_bytes"]
                r["workspace_vs_eager"] = _workspace_ratio(r, eager)
        out.append(r)
    return out


def _workspace_ratio(r: dict, eager: dict) -> Optional[float]:
    """(peak extra - gradients) / eager's: the memory a method needs beyond the dS,
    dweight and dbias every method must return. None without ``gradient_bytes``
    (older records) or when eager needed nothing beyond them."""
    grads = r.get("gradient_bytes")
    if grads is None or eager.get("gradient_bytes") is None:
        return None
    eager_workspace = eager["peak_extra_bytes"] - eager["gradient_bytes"]
    if eager_workspace <= 0:
        return None
    return max(r["peak_extra_bytes"] - grads, 0) / eager_workspace


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _mib(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / MiB:.1f}"


def markdown_table(records: Iterable[dict], phases: Optional[Iterable[str]] = None) -> str:
    """One row per record; columns explained in benchmarks/README.md."""
    keep = set(phases) if phases is not None else None
    header = ("| shape (B,T,K,Cs,Ct) | mode | dtype | phase | contender | median ms | p20-p80 ms | host-incl. ms "
              "| x eager | x compiled | GB/s | x floor | peak extra MiB | mem/eager | workspace/eager | status |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in records:
        if keep is not None and r["phase"] not in keep:
            continue
        s = r["shape"]
        shape = f"{s['name']} ({s['B']},{s['T']},{s['K']},{s['Cs']},{s['Ct']})"
        ok = r.get("status") == "ok"
        spread = f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}" if ok else "-"
        lines.append(
            f"| {shape} | {r['mode']} | {r['dtype']} | {r['phase']} | {r['contender']} "
            f"| {_fmt(r.get('median_ms') if ok else None, '.3f')} | {spread} "
            f"| {_fmt(r.get('wall_ms') if ok else None, '.3f')} "
            f"| {_fmt(r.get('x_eager'), '.2f')} | {_fmt(r.get('x_compiled'), '.2f')} "
            f"| {_fmt(r.get('achieved_gbps'), '.3g')} | {_fmt(r.get('x_floor'), '.2f')} "
            f"| {_mib(r.get('peak_extra_bytes'))} | {_fmt(r.get('memory_vs_eager'), '.3f')} "
            f"| {_fmt(r.get('workspace_vs_eager'), '.3f')} | {r.get('status', '?')} |"
        )
    return "\n".join(lines)


def target_lines(records: List[dict], shapes: Iterable[str] = ("iwslt", "wmt", "long")) -> List[str]:
    """The issue's targets, checked on forward+backward at the realistic shapes.

    Each line gives the worst case (the target must hold everywhere) and the number of
    configurations it covers; a missing baseline is reported, never guessed.
    """
    shapes = set(shapes)
    lines = []
    for name in FUSED:
        rows = [r for r in records if r["contender"] == name and r["phase"] == "forward+backward"
                and r["shape"]["name"] in shapes]
        ok = [r for r in rows if r.get("status") == "ok"]
        if not rows:
            continue
        if not ok:
            lines.append(f"{name}: no successful forward+backward run ({rows[0].get('status')})")
            continue
        checks = [
            ("speedup vs eager", "x_eager", min, TARGET_SPEEDUP_EAGER, ">=", "x"),
            ("speedup vs compiled", "x_compiled", min, TARGET_SPEEDUP_COMPILED, ">=", "x"),
            ("time / byte floor", "x_floor", max, TARGET_X_FLOOR, "<=", "x"),
            ("extra peak memory / eager's", "memory_vs_eager", max, 1 - TARGET_MEMORY_SAVING, "<=", ""),
            # The same, both sides less the gradients every method returns (dS alone is
            # Cs/(Cs + Ct) of the input bytes, so the line above can miss on dS alone).
            ("extra peak memory beyond the gradients / eager's", "workspace_vs_eager", max,
             1 - TARGET_MEMORY_SAVING, "<=", ""),
        ]
        for label, key, worst, target, op, unit in checks:
            vals = [r[key] for r in ok if r.get(key) is not None]
            if not vals:
                lines.append(f"{name}: {label}: no baseline measured")
                continue
            w = worst(vals)
            met = w >= target if op == ">=" else w <= target
            lines.append(
                f"{name}: {label}: worst {w:.3f}{unit} over {len(vals)} configs "
                f"(target {op} {target:g}{unit}) {'MET' if met else 'MISSED'}"
            )
        failed = [r for r in rows if r.get("status") != "ok"]
        if failed:
            lines.append(f"{name}: {len(failed)} forward+backward configs did not run: "
                         + "; ".join(sorted({r['status'] for r in failed}))[:300])
    return lines


def compact_summary(records: List[dict], phase: str = "forward+backward") -> str:
    """One line per (shape, mode, dtype) of ``phase``: each contender's median, and for
    the others their speedup over eager, time over the byte floor and memory vs eager."""
    rows: Dict[Tuple, Dict[str, dict]] = {}
    names: List[str] = []
    for r in records:
        if r["phase"] != phase:
            continue
        rows.setdefault((r["shape"]["name"], r["mode"], r["dtype"]), {})[r["contender"]] = r
        if r["contender"] not in names:
            names.append(r["contender"])
    header = f"{phase}: median ms [x eager, x floor, extra memory / eager's]"
    lines = [header, "| shape | mode | dtype | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for (shape, mode, dtype), by_name in rows.items():
        cells = []
        for n in names:
            r = by_name.get(n)
            if r is None:
                cells.append("-")
            elif r.get("status") != "ok":
                cells.append(str(r.get("status"))[:40])
            elif n == "eager":
                cells.append(f"{r['median_ms']:.3f} [{_fmt(r.get('x_floor'), '.1f')}]")
            else:
                cells.append(f"{r['median_ms']:.3f} [{_fmt(r.get('x_eager'), '.3g')}x, "
                             f"{_fmt(r.get('x_floor'), '.2f')}, {_fmt(r.get('memory_vs_eager'), '.3f')}]")
        lines.append(f"| {shape} | {mode} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
