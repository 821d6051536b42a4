"""Teacher against students (no KD, word-KD, word-KD + A2D) on one corpus, over seeds.

The pipeline behind ``a2d-train demo`` (tiny presets, one seed, CPU) and
``a2d-train compare`` (any plan, several seeds, student runs in parallel processes):

1. Build the embedded en->X corpus from the installed gettext catalogs, or reuse a
   prebuilt corpus folder.
2. Train the teacher (and its sentencepiece model) for a share of the time budget.
3. Distill the students in two waves, update for update: first the A2D student of every
   seed, capped at ``plan.student_updates`` updates and its time share; then the no-KD and
   word-KD baselines of each seed for the number of updates that seed's A2D student
   reached (they are cheaper per update, so they fit in the same time).
4. Score every model's best checkpoint (lowest validation NLL) on the test split with
   sacrebleu, inside the job that trained it, so the scoring runs in parallel too.

``results.json`` and ``results.md`` are rewritten (atomically) as each run ends, so a run
cut short still leaves what it finished. With several seeds the table ends with the mean
and standard deviation per variant and the paired (same seed) A2D minus word-KD gap.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from . import atomic
from .model import resolve_config

# The release's attention-weight schedule, beta * decay**(epoch - 1), spans its 100 epochs.
RELEASE_EPOCHS = 100
VARIANT_LABELS = {"none": "no KD", "word": "word-KD", "a2d": "word-KD + A2D"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Presets, training options and the time split of one comparison.

    ``training``: TrainConfig fields shared by every run. The A2D students tick the
    attention-weight decay once per ``planned updates / 100`` (the release's 100-epoch
    schedule squeezed into the run) instead of once per epoch as released: a run of a
    few hundred updates never leaves epoch 1-2 otherwise and keeps the weight at 1
    (README, "The trainer"). ``student_updates_from_teacher``: plan those updates from
    the teacher's measured rate (:func:`a2d_updates`), at most ``student_updates``, for a
    device whose speed is not known in advance. Shares are fractions of the training
    budget per wave.
    """

    teacher_preset: str
    student_preset: str
    training: Mapping[str, object]
    student_updates: int
    eval_sentences: int
    teacher_updates: int = 0  # 0: the teacher trains for its time share
    student_updates_from_teacher: bool = False
    teacher_share: float = 0.42
    a2d_share: float = 0.17
    baseline_share: float = 0.40  # both baselines; a cap: they stop at their A2D student's update count first


PLANS: Dict[str, Plan] = {
    # Minutes of CPU: small batches for many updates, a short warm-up. 360 updates is what
    # the A2D share gave on the 2-core reference machine.
    "demo": Plan(
        teacher_preset="tiny-teacher", student_preset="tiny-student",
        training=dict(vocab_size=3000, max_len=64, max_tokens=2048, lr=1e-3, warmup_updates=100,
                      max_epochs=1000, log_every=10, save_every=0, clip_norm=1.0),
        student_updates=360, eval_sentences=300),
    # The release's models (6+6 teacher, 3+3 student, 4 heads, d=512, FFN 1024, dropout 0.3),
    # its batch size, learning rate and unclipped gradients, for a GPU run of minutes: a
    # short warm-up, and the release's schedule shape scaled to a run whose length is
    # planned from the teacher's speed on that device.
    "release": Plan(
        teacher_preset="teacher", student_preset="student",
        training=dict(vocab_size=8000, max_len=128, max_tokens=4096, lr=5e-4, warmup_updates=500,
                      max_epochs=1000, log_every=50, save_every=0, clip_norm=0.0),
        student_updates=20000, student_updates_from_teacher=True, eval_sentences=500,
        teacher_share=0.40, a2d_share=0.25, baseline_share=0.35),
}


def run_name(role: str, seed: int, seeds: Sequence[int]) -> str:
    """``teacher``, ``student_a2d``, ...; students carry their seed when there are several."""
    return role if role == "teacher" or len(seeds) == 1 else f"{role}_seed{seed}"


def label(plan: Plan, role: str) -> str:
    if role == "teacher":
        cfg = resolve_config(plan.teacher_preset)
        return f"teacher ({plan.teacher_preset}, {cfg.encoder_layers}+{cfg.decoder_layers})"
    kd = role.split("_", 1)[1]
    return f"student, {VARIANT_LABELS[kd]}" + (" (scaled schedule)" if kd == "a2d" else "")


def train_and_score(cfg, score: Mapping[str, object]) -> dict:
    """One job: train ``cfg`` (a TrainConfig), then score its best checkpoint on the test
    split. Module level, so a spawned worker process can run it."""
    from .evaluate import evaluate_checkpoint
    from .train import train

    t0 = time.monotonic()
    summary = train(cfg)
    train_seconds = round(time.monotonic() - t0, 1)
    run_dir = Path(cfg.run_dir)
    scores = evaluate_checkpoint(summary["best_checkpoint"], cfg.data_dir, split="test", device=cfg.device,
                                 output=run_dir / "test_scores.json",
                                 hypotheses_out=run_dir / "test_hypotheses.txt", **score)
    return {"updates": summary["steps"], "train_seconds": train_seconds,
            "valid_nll": round(summary["best_valid_nll"], 3), "bleu": scores["bleu"], "chrf": scores["chrf"],
            "sentences": scores["sentences"], "bleu_signature": scores["bleu_signature"],
            "best_checkpoint": summary["best_checkpoint"]}


def run_comparison(plan: Plan, run_dir, minutes: float, seeds: Sequence[int] = (1,), parallel: int = 1,
                   data_dir=None, target_lang: str = "de", beam: int = 4, device: str = "cpu",
                   eval_sentences: Optional[int] = None, a2d_backend: str = "auto",
                   progress: bool = True) -> Dict[str, dict]:
    """Run the comparison; return ``{run name: scores}`` (teacher first, then per seed
    no-KD, word-KD, A2D). ``minutes`` bounds the training waves together (corpus building
    and scoring come on top); ``parallel`` student jobs run at once, each in its own
    process (1: in this process); ``a2d_backend`` is the A2D students' loss backend."""
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    run_dir = Path(run_dir)
    budget = 60.0 * minutes
    t_start = time.monotonic()
    info = _corpus(data_dir, run_dir / "data", target_lang)

    roles = [("student_none", "none"), ("student_word", "word"), ("student_a2d", "a2d")]
    names = ["teacher"] + [run_name(role, s, seeds) for s in seeds for role, _ in roles]
    for name in names:  # this comparison's own folders: a rerun starts its runs afresh
        if (run_dir / name).is_dir():
            print(f"[compare] removing the previous {run_dir / name}")
            shutil.rmtree(run_dir / name)
    for stale in ("results.json", "results.md"):  # a previous run's table must not pass for this one's
        (run_dir / stale).unlink(missing_ok=True)

    common = dict(plan.training, data_dir=str(info.out_dir), device=device)
    score = dict(beam=beam, limit=plan.eval_sentences if eval_sentences is None else eval_sentences)
    results: Dict[str, dict] = {}
    failures: List[Exception] = []
    planned: Dict[str, int] = {}  # the A2D students' update target, once known

    def ordered() -> Dict[str, dict]:
        return {n: results[n] for n in names if n in results}

    def save_results() -> None:
        done = ordered()
        atomic.write_text(run_dir / "results.json", json.dumps(
            {"plan": dataclasses.asdict(plan), "seeds": seeds, "a2d_planned_updates": planned.get("updates"),
             "corpus": info.counts, "beam": beam, "device": device, "a2d_backend": a2d_backend,
             "results": done, "summary": seed_summary(done, seeds),
             "total_seconds": round(time.monotonic() - t_start, 1)}, indent=1) + "\n")
        atomic.write_text(run_dir / "results.md", results_table(done, seeds) + "\n")

    def wave(title: str, jobs: List[tuple], share: float) -> None:
        """Run ``jobs`` ((name, role, TrainConfig kwargs)), ``parallel`` at a time, within
        ``share`` of the budget together. Results are saved as each job ends; a failed
        job is reported and kept in ``failures`` while the others go on."""
        rounds = math.ceil(len(jobs) / parallel)
        cap = share * budget / rounds
        workers = min(parallel, len(jobs))
        configs = [(name, role, _config(common, run_dir / name, time_budget=cap, progress=progress and workers == 1,
                                        threads=_threads(workers), **kwargs)) for name, role, kwargs in jobs]
        print(f"[compare] {title}: {len(jobs)} run(s), {workers} at a time, {cap:.0f} s each at most")
        for i, out in _run_jobs([cfg for _, _, cfg in configs], score, workers):
            name, role, cfg = configs[i]
            if isinstance(out, Exception):
                failures.append(out)
                print(f"[compare] {name}: FAILED: {type(out).__name__}: {out}")
                continue
            results[name] = {"label": label(plan, role), "seed": cfg.seed, **out}
            if role != "teacher":
                results[name]["target_updates"] = cfg.max_steps
            print(f"[compare] {name}: {out['updates']} updates in {out['train_seconds']} s, best valid NLL "
                  f"{out['valid_nll']:.3f}, BLEU {out['bleu']:.2f} on {out['sentences']} test sentences")
            save_results()

    wave("teacher", [("teacher", "teacher", dict(preset=plan.teacher_preset, seed=seeds[0],
                                                 max_steps=plan.teacher_updates))], plan.teacher_share)
    if failures:  # every student needs the teacher
        raise failures[0]
    student = dict(preset=plan.student_preset, teacher=results["teacher"]["best_checkpoint"],
                   teacher_preset=plan.teacher_preset)
    updates = planned["updates"] = a2d_updates(plan, results["teacher"], budget, min(parallel, len(seeds)),
                                               math.ceil(len(seeds) / parallel))
    decay_every = updates / RELEASE_EPOCHS
    wave("A2D students", [(run_name("student_a2d", s, seeds), "student_a2d",
                           dict(student, kd="a2d", seed=s, max_steps=updates,
                                a2d_decay_every=decay_every, a2d_backend=a2d_backend)) for s in seeds],
         plan.a2d_share)
    # Update for update with that seed's A2D student; its plan when it failed.
    matched = {s: results.get(run_name("student_a2d", s, seeds), {}).get("updates", updates) for s in seeds}
    wave("baseline students", [(run_name(role, s, seeds), role, dict(student, kd=kd, seed=s, max_steps=matched[s]))
                               for s in seeds for role, kd in roles[:2]], plan.baseline_share)

    print("\n" + results_table(ordered(), seeds))
    print(f"\n[compare] total {(time.monotonic() - t_start) / 60:.1f} min; outputs in {run_dir}")
    if failures:
        print(f"[compare] {len(failures)} run(s) failed (see above); the table holds the others")
        raise failures[0]
    return ordered()


def a2d_updates(plan: Plan, teacher: Mapping[str, float], budget: float, workers: int, rounds: int) -> int:
    """The A2D students' update target: the plan's, or (``student_updates_from_teacher``)
    the teacher's measured updates per second, shared by the ``workers`` students that
    train at once on the device, times each A2D run's time cap (``rounds`` runs follow
    each other in the wave), at most the plan's. Sharing is taken to be even (a device
    the teacher kept busy); on one it left idle the students reach the target early,
    which costs time but keeps the schedule exact."""
    if not plan.student_updates_from_teacher:
        return plan.student_updates
    # Its loop stopped at the time cap; train_seconds also holds setup and validation.
    loop_s = min(teacher["train_seconds"], plan.teacher_share * budget)
    rate = teacher["updates"] / max(loop_s, 1e-3) / workers
    updates = max(1, min(plan.student_updates, int(rate * plan.a2d_share * budget / rounds)))
    print(f"[compare] teacher: {rate * workers:.1f} updates/s; A2D students ({workers} at a time) planned "
          f"for {updates} updates")
    return updates


def _corpus(given, default: Path, target_lang: str):
    """A folder ``build_corpus`` completed: ``given`` must be one; ``default`` is reused when
    it is one and built from the installed catalogs when not."""
    from .corpus import build_corpus, load_corpus_info

    if given is not None:
        info = load_corpus_info(given)
        print(f"[compare] corpus: {given}")
    else:
        try:
            info = load_corpus_info(default)
            print(f"[compare] corpus: reusing {default}")
        except ValueError:
            print(f"[compare] corpus: extracting en->{target_lang} pairs from installed gettext catalogs ...")
            info = build_corpus(default, target_lang=target_lang)
    print("[compare] corpus: " + ", ".join(f"{k} {v}" for k, v in info.counts.items())
          + f" pairs from {len(info.catalogs)} catalogs")
    return info


def _config(common: Mapping[str, object], run_dir: Path, **kwargs):
    from .train import TrainConfig

    cfg = TrainConfig(**{**common, "run_dir": str(run_dir), **kwargs})
    cfg.validate()  # a bad plan fails here, before any process starts
    return cfg


def _threads(workers: int) -> int:
    """CPU threads per job: the machine's cores shared out (0, torch's default, for one job)."""
    if workers == 1:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def _run_jobs(configs: list, score: Mapping[str, object], workers: int) -> Iterator[Tuple[int, object]]:
    """``(index, result or the exception it raised)`` per config, as each ends: a failed
    job does not stop the others. Several workers: spawned processes (CUDA cannot be
    forked), one job each at a time."""
    if workers == 1:
        for i, cfg in enumerate(configs):
            yield i, _outcome(train_and_score, cfg, score)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(train_and_score, cfg, score): i for i, cfg in enumerate(configs)}
        for future in as_completed(futures):
            yield futures[future], _outcome(future.result)


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported per run, raised at the end
        return exc


def seed_summary(results: Mapping[str, dict], seeds: Sequence[int]) -> Dict[str, dict]:
    """Per student variant: mean and sample standard deviation over seeds of BLEU, chrF and
    valid NLL; and the paired A2D minus word-KD BLEU gap (same seed). Only complete
    variants are summarized, and only with two seeds or more."""
    if len(seeds) < 2:
        return {}
    summary: Dict[str, dict] = {}
    for kd in ("none", "word", "a2d"):
        runs = [results.get(run_name(f"student_{kd}", s, seeds)) for s in seeds]
        if any(r is None for r in runs):
            continue
        summary[kd] = {key: {"mean": statistics.mean(r[key] for r in runs),
                             "std": statistics.stdev(r[key] for r in runs)}
                       for key in ("bleu", "chrf", "valid_nll")}
    if "a2d" in summary and "word" in summary:
        gaps = [results[run_name("student_a2d", s, seeds)]["bleu"] - results[run_name("student_word", s, seeds)]["bleu"]
                for s in seeds]
        std = statistics.stdev(gaps)
        summary["a2d_minus_word_bleu"] = {"per_seed": gaps, "mean": statistics.mean(gaps), "std": std,
                                          "stderr": std / math.sqrt(len(gaps)),
                                          "a2d_ahead": sum(g > 0 for g in gaps), "seeds": len(gaps)}
    return summary


def results_table(results: Mapping[str, dict], seeds: Sequence[int]) -> str:
    several = len(seeds) > 1
    rows: List[str] = ["| model | " + ("seed | " if several else "") + "updates | train s | valid NLL | BLEU | chrF |",
                       "|---|" + ("---:|" if several else "") + "---:|---:|---:|---:|---:|"]
    for r in results.values():
        updates = str(r["updates"])
        if r.get("target_updates") and r["updates"] < r["target_updates"]:
            updates += f" of {r['target_updates']}"  # stopped at its time cap first
        rows.append(f"| {r['label']} | " + (f"{r['seed']} | " if several else "")
                    + f"{updates} | {r['train_seconds']:.0f} | {r['valid_nll']:.3f} | "
                    f"{r['bleu']:.2f} | {r['chrf']:.2f} |")
    summary = seed_summary(results, seeds)
    if summary:
        rows += ["", f"Over {len(seeds)} seeds (mean ± sample std):", "",
                 "| student | valid NLL | BLEU | chrF |", "|---|---:|---:|---:|"]
        for kd in ("none", "word", "a2d"):
            if kd in summary:
                s = summary[kd]
                cells = [_mean_std(s[key], 3 if key == "valid_nll" else 2) for key in ("valid_nll", "bleu", "chrf")]
                rows.append(f"| {VARIANT_LABELS[kd]} | " + " | ".join(cells) + " |")
        gap = summary.get("a2d_minus_word_bleu")
        if gap:
            rows += ["", f"A2D minus word-KD BLEU, same seed: {gap['mean']:+.2f} ± {gap['stderr']:.2f} (standard "
                     f"error; per seed {', '.join(f'{g:+.2f}' for g in gap['per_seed'])}); A2D ahead on "
                     f"{gap['a2d_ahead']} of {gap['seeds']} seeds."]
    return "\n".join(rows)


def _mean_std(stat: Mapping[str, float], digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
