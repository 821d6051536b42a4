"""``a2d-train demo``: the paper's pipeline end to end, small enough for a laptop CPU.

1. Build the embedded en->X corpus from the installed gettext catalogs (nothing downloaded).
2. Train a ``tiny-teacher`` (and its sentencepiece model) for a share of the time budget.
3. Distill three ``tiny-student`` models from it: A2D first, for ``STUDENT_UPDATES``
   updates (its time share is a cap); then the no-KD and word-KD baselines for the same
   number of updates (they are cheaper per update, so they fit in the same time), so the
   comparison is update for update. The A2D student follows the release's attention-
   weight schedule (``decay**(epoch - 1)`` over 100 epochs) scaled to its run:
   ``a2d_decay_every = STUDENT_UPDATES / 100``. At the release's per-epoch clock a run
   this short keeps the weight at 1 throughout, where the attention gradient measured
   4-7x that of CE + word-KD and the student lost ~4 BLEU (README, "Trainer").
4. Score every model's best checkpoint (lowest validation NLL) on the test split with
   sacrebleu and print the table; ``results.json`` / ``results.md`` go to the run folder.

Tiny models trained for minutes are far from converged: the point is the pipeline, and
the table shows the usual ordering only roughly. The GPU recipe in the README uses the
release's presets.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Dict, List

from . import atomic

# Shares of the training budget (corpus building and scoring come on top). The baselines
# get the A2D student's update count, capped at a little more than its time share: they
# are cheaper per update, so the cap only bites on a machine that slowed down meanwhile.
TEACHER_SHARE = 0.42
A2D_SHARE = 0.17
BASELINE_CAP = 0.20
EVAL_SENTENCES = 300  # test sentences scored per model (the first ones of the split)
STUDENT_UPDATES = 360  # what the A2D share gave on the 2-core reference machine
RELEASE_EPOCHS = 100  # the release's --max-epoch: its decay schedule spans this many

# Minutes of CPU training: small batches for many updates, a short warm-up.
COMMON = dict(vocab_size=3000, max_len=64, max_tokens=2048, lr=1e-3, warmup_updates=100, max_epochs=1000,
              log_every=10, save_every=0, clip_norm=1.0)


def run_demo(run_dir="runs/demo", minutes: float = 12.0, target_lang: str = "de", beam: int = 4, seed: int = 1,
             device: str = "cpu", eval_sentences: int = EVAL_SENTENCES, progress: bool = True) -> Dict[str, dict]:
    """Run the pipeline; return ``{name: scores}``. ``minutes`` bounds the training stages
    together (teacher 42 %, A2D student at most 17 % and ``STUDENT_UPDATES``, each
    baseline at most 20 %)."""
    from .corpus import build_corpus, load_corpus_info
    from .evaluate import evaluate_checkpoint
    from .train import TrainConfig, train

    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    run_dir = Path(run_dir)
    budget = 60.0 * minutes
    t_start = time.monotonic()

    data_dir = run_dir / "data"
    try:
        info = load_corpus_info(data_dir)
        print(f"[demo] corpus: reusing {data_dir}")
    except ValueError:
        print(f"[demo] corpus: extracting en->{target_lang} pairs from installed gettext catalogs ...")
        info = build_corpus(data_dir, target_lang=target_lang)
    print("[demo] corpus: " + ", ".join(f"{k} {v}" for k, v in info.counts.items())
          + f" pairs from {len(info.catalogs)} catalogs")

    stages = ("teacher", "student_a2d", "student_none", "student_word")
    for name in stages:  # the demo's own folders: a rerun starts its runs afresh
        if (run_dir / name).is_dir():
            print(f"[demo] removing the previous {run_dir / name}")
            shutil.rmtree(run_dir / name)

    common = dict(COMMON, data_dir=str(data_dir), seed=seed, device=device, progress=progress)
    runs: Dict[str, dict] = {}

    def stage(name, **kwargs):
        print(f"[demo] {name}: training ({kwargs.get('time_budget', 0):.0f} s budget"
              + (f", {kwargs['max_steps']} updates" if kwargs.get("max_steps") else "") + ") ...")
        t0 = time.monotonic()
        summary = train(TrainConfig(run_dir=str(run_dir / name), **common, **kwargs))
        summary["train_seconds"] = round(time.monotonic() - t0, 1)
        runs[name] = summary
        print(f"[demo] {name}: {summary['steps']} updates in {summary['train_seconds']} s, "
              f"best valid NLL {summary['best_valid_nll']:.3f}")
        return summary

    stage("teacher", preset="tiny-teacher", time_budget=TEACHER_SHARE * budget)
    teacher_ckpt = runs["teacher"]["best_checkpoint"]
    student = dict(preset="tiny-student", teacher=teacher_ckpt, teacher_preset="tiny-teacher")
    a2d = stage("student_a2d", kd="a2d", max_steps=STUDENT_UPDATES, time_budget=A2D_SHARE * budget,
                a2d_decay_every=STUDENT_UPDATES / RELEASE_EPOCHS, **student)
    for kd in ("none", "word"):
        stage(f"student_{kd}", kd=kd, max_steps=a2d["steps"], time_budget=BASELINE_CAP * budget, **student)

    labels = {"teacher": "teacher (tiny-teacher, 4+4)", "student_none": "student, no KD",
              "student_word": "student, word-KD", "student_a2d": "student, word-KD + A2D (scaled schedule)"}
    results: Dict[str, dict] = {}
    for name in ("teacher", "student_none", "student_word", "student_a2d"):
        print(f"[demo] {name}: translating {eval_sentences} test sentences (beam {beam}) ...")
        scores = evaluate_checkpoint(runs[name]["best_checkpoint"], data_dir, split="test", beam=beam,
                                     device=device, limit=eval_sentences,
                                     output=run_dir / name / "test_scores.json",
                                     hypotheses_out=run_dir / name / "test_hypotheses.txt")
        results[name] = {"label": labels[name], "bleu": scores["bleu"], "chrf": scores["chrf"],
                         "updates": runs[name]["steps"], "train_seconds": runs[name]["train_seconds"],
                         "valid_nll": round(runs[name]["best_valid_nll"], 3),
                         "sentences": scores["sentences"], "bleu_signature": scores["bleu_signature"]}

    table = _table(results)
    total = time.monotonic() - t_start
    print("\n" + table)
    print(f"\n[demo] total {total / 60:.1f} min; outputs in {run_dir}")
    atomic.write_text(run_dir / "results.json", json.dumps(
        {"results": results, "corpus": info.counts, "total_seconds": round(total, 1), "beam": beam}, indent=1) + "\n")
    atomic.write_text(run_dir / "results.md", table + "\n")
    return results


def _table(results: Dict[str, dict]) -> str:
    rows: List[str] = ["| model | updates | train s | valid NLL | BLEU | chrF |",
                       "|---|---:|---:|---:|---:|---:|"]
    for r in results.values():
        rows.append(f"| {r['label']} | {r['updates']} | {r['train_seconds']:.0f} | {r['valid_nll']:.3f} | "
                    f"{r['bleu']:.2f} | {r['chrf']:.2f} |")
    return "\n".join(rows)
