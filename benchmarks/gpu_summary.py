"""What ``gpu_check.py``'s summary quotes from the steps' outputs: the tail of a log
(a compiler's error lines first), the benchmark's compact table and target checks, and,
when ``bench_a2d.py`` was killed before merging, its contenders' parts merged.

A missing or unreadable file gives a line that says so, not an exception (the
orchestrator's stage guard catches anything else).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

_NOISE = ("!!", "****", "Deprecat", "deprecat", "corresp(", "By 20", "or your builds", "See https://",
          "Please use a simple string")


def log_tail(path: Path, n: int = 20, prefer: Sequence[str] = ()) -> List[str]:
    """The last ``n`` lines of a log, or, when some lines contain one of ``prefer``, the
    last ``n`` of those (the error lines of a compiler's output); setuptools'
    deprecation banners are left out."""
    try:
        lines = [ln.rstrip() for ln in path.read_text(errors="replace").splitlines()
                 if ln.strip() and not any(x in ln for x in _NOISE)]
    except OSError:
        return []
    hits = [ln for ln in lines if any(p in ln.lower() for p in prefer)] if prefer else []
    return [ln[:300] for ln in (hits or lines)[-n:]]


def bench_summary(path: Path) -> List[str]:
    """The benchmark's compact forward+backward table and target checks, for the
    summary printed last (the part of the output a reader sees first)."""
    try:
        import report

        results = json.loads(path.read_text())
    except Exception as exc:  # noqa: BLE001
        return [f"  no benchmark results to summarize ({type(exc).__name__}: {exc})"]
    records = results["records"]
    realistic = [r for r in records if r["shape"]["name"] in ("iwslt", "wmt", "long")] or records
    meta = results.get("meta", {})
    bw = meta.get("copy_bytes_per_s")
    lines = [f"device {meta.get('device_name')}, copy bandwidth {bw / 1e9:.0f} GB/s" if bw else "no copy bandwidth"]
    lines += [f"skipped {k}: {v}" for k, v in meta.get("skipped_contenders", {}).items()]
    n_ok = sum(r.get("status") == "ok" for r in records)
    lines.append(f"{n_ok}/{len(records)} measurements ok")
    lines.append(report.compact_summary(realistic))
    lines += ["target: " + t for t in report.target_lines(records)]
    return lines


def merge_bench_parts(bench_dir: Path) -> Optional[Path]:
    """When bench_a2d.py was killed before merging, merge what its contenders wrote
    (each writes its own results.json as it goes) into results.json (partial: true)."""
    try:
        import report

        parts = [json.loads(p.read_text()) for p in sorted(bench_dir.glob("parts/*/results.json"))]
        if not parts:
            return None
        meta = dict(parts[0]["meta"], partial=True, skipped_contenders={})
        for part in parts:
            meta["skipped_contenders"].update(part["meta"].get("skipped_contenders", {}))
        records = report.derive([r for part in parts for r in part["records"]], meta.get("copy_bytes_per_s"))
        path = bench_dir / "results.json"
        path.write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=str))
        return path
    except Exception as exc:  # noqa: BLE001 - a summary helper never ends the run
        print(f"bench parts not merged: {type(exc).__name__}: {exc}", flush=True)
        return None
