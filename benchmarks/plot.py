"""PNG plots of the T sweep: time and peak extra memory versus T, one line per contender.

One figure per (mode, dtype): the top row is time (median, error bars p20..p80), the
bottom row peak memory above the inputs, one column per phase; both axes log scale.
A contender that ran out of memory at some T shows "OOM at T=..." in its legend entry.

    python benchmarks/plot.py benchmarks/results/<run>/results.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List

MiB = 1024 * 1024


def _series(records: List[dict], contender: str, phase: str):
    rows = sorted((r for r in records if r["contender"] == contender and r["phase"] == phase),
                  key=lambda r: r["shape"]["T"])
    ok = [r for r in rows if r.get("status") == "ok"]
    oom = [r["shape"]["T"] for r in rows if r.get("status") == "oom"]
    return ok, oom


def plot_results(results: dict, out_dir: Path) -> List[Path]:
    """Write one PNG per (mode, dtype) with at least two sweep points; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in results["records"] if r.get("sweep")]
    meta = results.get("meta", {})
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault((r["mode"], r["dtype"]), []).append(r)

    paths = []
    for (mode, dtype), rows in sorted(groups.items()):
        if len({r["shape"]["T"] for r in rows}) < 2:
            continue
        phases = [p for p in ("forward", "backward", "forward+backward") if any(r["phase"] == p for r in rows)]
        names = list(dict.fromkeys(r["contender"] for r in rows))
        fig, axes = plt.subplots(2, len(phases), figsize=(5 * len(phases), 8), squeeze=False)
        for col, phase in enumerate(phases):
            t_ax, m_ax = axes[0][col], axes[1][col]
            for name in names:
                ok, oom = _series(rows, name, phase)
                label = name + (f" (OOM at T={','.join(map(str, oom))})" if oom else "")
                if ok:
                    T = [r["shape"]["T"] for r in ok]
                    med = [r["median_ms"] for r in ok]
                    err = [[r["median_ms"] - r["p20_ms"] for r in ok], [r["p80_ms"] - r["median_ms"] for r in ok]]
                    t_ax.errorbar(T, med, yerr=err, marker="o", capsize=3, label=label)
                    mem = [(r["shape"]["T"], r["peak_extra_bytes"] / MiB) for r in ok
                           if r.get("peak_extra_bytes")]
                    if mem:
                        m_ax.plot(*zip(*mem), marker="o", label=label)
            # The floor depends on the shape only: take it from any contender that ran,
            # so it still spans the T where eager ran out of memory.
            floor = dict(sorted((r["shape"]["T"], r["floor_ms"]) for r in rows
                                if r["phase"] == phase and r.get("status") == "ok" and r.get("floor_ms")))
            if floor:
                t_ax.plot(list(floor), list(floor.values()), "k--", linewidth=1,
                          label="byte floor (copy bandwidth)")
            for ax in (t_ax, m_ax):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("T = K (tokens per batch fixed)")
                ax.grid(True, which="both", alpha=0.3)
            t_ax.set_title(f"{phase}")
            t_ax.set_ylabel("time (ms)")
            m_ax.set_ylabel("peak memory above inputs (MiB)")
            t_ax.legend(fontsize=8)
            if m_ax.lines:
                m_ax.legend(fontsize=8)
            else:
                m_ax.text(0.5, 0.5, "no allocator statistics on this device", ha="center",
                          va="center", transform=m_ax.transAxes)
        fig.suptitle(f"A2D loss, normalize={mode}, {dtype} - {meta.get('device_name', '?')} "
                     f"({meta.get('date', '')[:10]})")
        fig.tight_layout()
        path = Path(out_dir) / f"sweep_{mode}_{dtype}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/plot.py RESULTS_JSON")
    src = Path(sys.argv[1])
    for p in plot_results(json.loads(src.read_text()), src.parent):
        print(p)
