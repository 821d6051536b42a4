"""Corpus BLEU and chrF with sacrebleu, on detokenized text.

Hypotheses are the sentencepiece-decoded model outputs and references the raw target
lines, so the scores are sacrebleu's standard ones (its own ``13a`` tokenization for
BLEU, character n-grams for chrF) and comparable across tokenizers.
"""
from __future__ import annotations

from typing import Dict, Sequence


def score_translations(hypotheses: Sequence[str], references: Sequence[str]) -> Dict[str, object]:
    """``{"bleu", "chrf", "bleu_signature", "chrf_signature", "sentences"}``."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"hypotheses and references must have the same length, got "
                         f"{len(hypotheses)} and {len(references)}")
    if not references:
        raise ValueError("references is empty: nothing to score")
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
    chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": round(bleu_score.score, 2),
        "chrf": round(chrf_score.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "sentences": len(references),
    }


def evaluate_checkpoint(checkpoint, data_dir, split: str = "test", beam: int = 5, length_penalty: float = 1.0,
                        batch_size: int = 64, output=None, hypotheses_out=None, preset=None,
                        device="cpu", limit: int = 0) -> Dict[str, object]:
    """Translate ``data_dir/{split}.src`` with a checkpoint and score it against
    ``{split}.tgt``. ``output`` (JSON scores) and ``hypotheses_out`` (one translation per
    line) are written atomically, only once everything succeeded. ``limit`` > 0 scores
    the first ``limit`` sentences only."""
    import json
    import time
    from pathlib import Path

    from . import atomic
    from .corpus import read_parallel
    from .train import load_model
    from .translate import translate_sentences

    data_dir = Path(data_dir)
    pairs = read_parallel(data_dir / f"{split}.src", data_dir / f"{split}.tgt")
    if limit:
        pairs = pairs[:limit]
    model, tokenizer, ckpt = load_model(checkpoint, preset=preset, device=device)
    start = time.monotonic()
    hyps = translate_sentences(model, tokenizer, [s for s, _ in pairs], beam=beam, batch_size=batch_size,
                               length_penalty=length_penalty, device=device)
    result = score_translations(hyps, [t for _, t in pairs])
    result.update({"checkpoint": str(checkpoint), "split": split, "beam": beam, "step": ckpt["step"],
                   "kd": ckpt["kd"], "seconds": round(time.monotonic() - start, 2)})
    if hypotheses_out is not None:
        atomic.write_lines(hypotheses_out, hyps)
    if output is not None:
        atomic.write_text(output, json.dumps(result, indent=1) + "\n")
    return result
