"""Collect every run in the scratch folder into results.json and print the README's tables.
usage (in the scratch folder, after lengths.py wrote lengths.json): python summarize.py OUT_JSON [MAX_SEED]
MAX_SEED (default 9) limits the seeds used, e.g. 5 for the planned seeds 1-5 only."""
import json
import math
import statistics as st
import sys
from pathlib import Path

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}  # two-sided 95 % t, by df


def last_json(path):
    for line in reversed(Path(path).read_text().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in {path}")


def run_info(name):
    log = [json.loads(l) for l in Path(f"runs/{name}/log.jsonl").read_text().splitlines() if l.strip()]
    valid = [r for r in log if r["kind"] == "valid"]
    best = min(valid, key=lambda r: r["nll"])
    summary = last_json(f"logs/{name}.out")
    ev = last_json(f"logs/{name}.eval")
    t = json.loads(Path(f"logs/{name}.time").read_text())
    stop = [r for r in log if r["kind"] == "stop"]
    lengths = json.loads(Path("lengths.json").read_text()).get(name, {}) if Path("lengths.json").exists() else {}
    return {"name": name, "bleu_parts": lengths, "updates": summary["steps"], "epoch": summary["epoch"],
            "best_valid_nll": round(summary["best_valid_nll"], 4), "best_valid_step": best["step"],
            "valid": [{"step": r["step"], "nll": round(r["nll"], 4)} for r in valid],
            "bleu": ev["bleu"], "chrf": ev["chrf"], "eval_step": ev["step"], "sentences": ev["sentences"],
            "bleu_signature": ev["bleu_signature"], "chrf_signature": ev["chrf_signature"],
            "train_loop_s": stop[-1]["seconds"] if stop else None,
            "train_wall_s": round(t["train_wall_s"], 1), "eval_wall_s": round(t["eval_wall_s"], 1),
            "start": t.get("start"), "end": t.get("end"),
            "command": Path(f"logs/{name}.cmd").read_text().strip() if Path(f"logs/{name}.cmd").exists() else None}


def stats(xs):
    n = len(xs)
    m = st.mean(xs)
    s = st.stdev(xs) if n > 1 else float("nan")
    return {"n": n, "mean": round(m, 4), "std": round(s, 4), "se": round(s / math.sqrt(n), 4) if n > 1 else None}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "results.json"
    max_seed = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    teacher = run_info("teacher")
    runs = {}
    for variant in ("word", "a2d", "none"):
        for seed in range(1, max_seed + 1):
            name = f"{variant}_s{seed}"
            if Path(f"logs/{name}.eval").exists() and Path(f"logs/{name}.time").exists():
                runs[name] = dict(run_info(name), variant=variant, seed=seed)
    variants = {}
    for variant in ("word", "a2d", "none"):
        rs = [r for r in runs.values() if r["variant"] == variant]
        if rs:
            variants[variant] = {"seeds": [r["seed"] for r in rs],
                                 **{k: stats([r[k] for r in rs]) for k in ("bleu", "chrf", "best_valid_nll")}}
    paired = {}
    for other in ("word", "none"):
        seeds = sorted(s for s in range(1, max_seed + 1) if f"a2d_s{s}" in runs and f"{other}_s{s}" in runs)
        if not seeds:
            continue
        p = {"seeds": seeds}
        for k in ("bleu", "chrf", "best_valid_nll"):
            d = [round(runs[f"a2d_s{s}"][k] - runs[f"{other}_s{s}"][k], 4) for s in seeds]
            sd = stats(d)
            better = [x > 0 for x in d] if k != "best_valid_nll" else [x < 0 for x in d]
            sd.update(diffs=d, a2d_better=sum(better),
                      t=round(sd["mean"] / sd["se"], 3) if sd["se"] else None,
                      ci95=[round(sd["mean"] - T95[len(d) - 1] * sd["se"], 3),
                            round(sd["mean"] + T95[len(d) - 1] * sd["se"], 3)] if sd["se"] else None)
            p[k] = sd
        paired[f"a2d_minus_{other}"] = p
    extra = {}
    if Path("logs/teacher_time302.eval").exists():  # the demo's 302.4 s time budget on this machine (not used)
        extra["teacher_time302_unused"] = run_info("teacher_time302")
    res = {"teacher": teacher, **extra, "runs": runs, "per_variant": variants, "paired": paired}
    Path(out).write_text(json.dumps(res, indent=1) + "\n")

    print(f"teacher: {teacher['updates']} updates, best valid NLL {teacher['best_valid_nll']:.3f} "
          f"(step {teacher['best_valid_step']}), BLEU {teacher['bleu']:.2f}, chrF {teacher['chrf']:.2f}, "
          f"train {teacher['train_wall_s']} s, eval {teacher['eval_wall_s']} s\n")
    print("| variant | seed | updates | best valid NLL (step) | BLEU | chrF | BLEU BP | hyp/ref length | runaway hyps | train s | eval s |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs.values():
        print(f"| {r['variant']} | {r['seed']} | {r['updates']} | {r['best_valid_nll']:.3f} ({r['best_valid_step']}) | "
              f"{r['bleu']:.2f} | {r['chrf']:.2f} | {r['bleu_parts'].get('bp', float('nan')):.3f} | "
              f"{r['bleu_parts'].get('len_ratio', float('nan')):.3f} | {r['bleu_parts'].get('runaway_hyps', '-')} | "
              f"{r['train_wall_s']:.0f} | {r['eval_wall_s']:.0f} |")
    print("\n| variant | seeds | BLEU mean ± std | chrF mean ± std | valid NLL mean ± std |")
    print("|---|---|---:|---:|---:|")
    for v, s in variants.items():
        print(f"| {v} | {','.join(map(str, s['seeds']))} | {s['bleu']['mean']:.2f} ± {s['bleu']['std']:.2f} | "
              f"{s['chrf']['mean']:.2f} ± {s['chrf']['std']:.2f} | "
              f"{s['best_valid_nll']['mean']:.3f} ± {s['best_valid_nll']['std']:.3f} |")
    for key, p in paired.items():
        print(f"\n{key}, seeds {p['seeds']}:")
        print("| metric | per-seed differences | mean | std | SE | mean/SE | 95% t-interval | A2D better |")
        print("|---|---|---:|---:|---:|---:|---|---:|")
        for k in ("bleu", "chrf", "best_valid_nll"):
            d = p[k]
            print(f"| {k} | {', '.join(f'{x:+.3f}' if k == 'best_valid_nll' else f'{x:+.2f}' for x in d['diffs'])} | "
                  f"{d['mean']:+.3f} | {d['std']:.3f} | {d['se']} | {d['t']} | {d['ci95']} | "
                  f"{d['a2d_better']}/{d['n']} |")


if __name__ == "__main__":
    main()
