"""``a2d-train demo``: the paper's pipeline end to end, small enough for a laptop CPU.

The ``demo`` plan of :mod:`a2d_trainer.compare` with one seed: build the embedded en->X
corpus, train a ``tiny-teacher``, distill three ``tiny-student`` models from it (A2D
first, for ``STUDENT_UPDATES`` updates; then no-KD and word-KD for as many), score each
on 300 test sentences and print the table. The A2D student follows the release's
attention-weight schedule (``decay**(epoch - 1)`` over 100 epochs) scaled to its run: at
the release's per-epoch clock a run this short keeps the weight at 1 throughout, where
the attention gradient measured 4-7x that of CE + word-KD and the student lost ~4 BLEU
(README, "The trainer").

Tiny models trained for minutes are far from converged: the point is the pipeline, and
the table shows the usual ordering only roughly. ``a2d-train compare --plan release``
runs the release's presets over several seeds (a GPU job: ``scripts/gpu_train.sh``).
"""
from __future__ import annotations

from typing import Dict

from .compare import PLANS, run_comparison

STUDENT_UPDATES = PLANS["demo"].student_updates
EVAL_SENTENCES = PLANS["demo"].eval_sentences


def run_demo(run_dir="runs/demo", minutes: float = 12.0, target_lang: str = "de", beam: int = 4, seed: int = 1,
             device: str = "cpu", eval_sentences: int = EVAL_SENTENCES, progress: bool = True) -> Dict[str, dict]:
    """Run the pipeline; return ``{name: scores}``. ``minutes`` bounds the training stages
    together (teacher 42 %, A2D student at most 17 % and ``STUDENT_UPDATES``, each
    baseline at most 20 %)."""
    return run_comparison(PLANS["demo"], run_dir, minutes=minutes, seeds=[seed], target_lang=target_lang,
                          beam=beam, device=device, eval_sentences=eval_sentences, progress=progress)
