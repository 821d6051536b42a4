"""a2d_trainer: a thin PyTorch trainer reproducing the Align-to-Distill pipeline.

Modules, one job each:

* ``corpus``: the embedded en->X corpus from installed gettext catalogs; parallel-text reading.
* ``data``: sentencepiece tokenizer, token-budget batching.
* ``model``: the post-norm Transformer that returns its attention maps (presets).
* ``objective``: the release's criterion (label-smoothed CE, word-KD, A2D attention loss).
* ``train``: the loop (checkpoints, exact resume, DDP, logs, plots).
* ``translate`` / ``evaluate``: greedy and beam search; sacrebleu BLEU and chrF.
* ``demo``: the whole pipeline, tiny, on the CPU. ``cli``: the ``a2d-train`` command.
"""
from .model import PRESETS, ModelConfig, Seq2SeqTransformer, build_model

__all__ = ["PRESETS", "ModelConfig", "Seq2SeqTransformer", "build_model"]
