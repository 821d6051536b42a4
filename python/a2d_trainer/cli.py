"""``a2d-train``: build the corpus, train a teacher, distill a student, translate, evaluate.

    a2d-train corpus --out data/                         # en->de pairs from installed .mo catalogs
    a2d-train train-teacher --data data/ --run-dir runs/teacher --preset tiny-teacher --max-epochs 20
    a2d-train distill --data data/ --run-dir runs/a2d --teacher runs/teacher/checkpoint_best.pt \\
        --preset tiny-student --kd a2d                   # or --kd word / --kd none
    a2d-train evaluate --checkpoint runs/a2d/checkpoint_best.pt --data data/ --beam 5
    a2d-train translate --checkpoint runs/a2d/checkpoint_best.pt --input in.txt --output out.txt
    a2d-train demo                                       # all of the above, tiny, ~15 min on 2 cores
    a2d-train compare --plan release --minutes 7 --seeds 1,2,3 --parallel 3   # the release's presets, GPU

Training runs under ``torchrun --nproc_per_node N -m a2d_trainer.cli train-teacher ...``
as well (DDP). Errors on bad input end the command with one line naming the problem.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from a2d_kernels.problem import BACKEND_NAMES

from .compare import PLANS
from .model import PRESETS


def _add_training_args(p: argparse.ArgumentParser, preset: str) -> None:
    p.add_argument("--data", required=True, help="folder with {train,valid}.{src,tgt}")
    p.add_argument("--run-dir", required=True, help="output folder: checkpoints, log.jsonl, plot, tokenizer")
    p.add_argument("--preset", default=preset, choices=sorted(PRESETS))
    p.add_argument("--tokenizer", help="sentencepiece .model to use instead of training one (with a teacher: its pieces must be the teacher's)")
    p.add_argument("--vocab-size", type=int, default=4000, help="pieces, when a tokenizer is trained")
    p.add_argument("--max-len", type=int, default=128, help="max subword tokens per sentence")
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget per micro-batch")
    p.add_argument("--update-freq", type=int, default=1, help="micro-batches per optimizer update")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-updates", type=int, default=4000)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=0.0, help="gradient clipping norm (0: off)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--dropout", type=float, help="override the preset's dropout")
    p.add_argument("--max-epochs", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds of training (0: no limit)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--save-every", type=int, default=0, help="updates between checkpoints (0: per epoch)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"], help="auto: bf16 autocast on CUDA")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint_last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _training_config(args, **extra):
    from .train import TrainConfig

    return TrainConfig(
        data_dir=args.data, run_dir=args.run_dir, preset=args.preset, tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, max_len=args.max_len, max_tokens=args.max_tokens,
        update_freq=args.update_freq, lr=args.lr, warmup_updates=args.warmup_updates,
        weight_decay=args.weight_decay, clip_norm=args.clip_norm, label_smoothing=args.label_smoothing,
        dropout=args.dropout, max_epochs=args.max_epochs, max_steps=args.max_steps,
        time_budget=args.time_budget, seed=args.seed, save_every=args.save_every, log_every=args.log_every,
        amp=args.amp, device=args.device, threads=args.threads, resume=args.resume,
        progress=not args.no_progress, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="a2d-train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("corpus", help="extract en->X pairs from installed gettext catalogs")
    p.add_argument("--out", required=True)
    p.add_argument("--target-lang", default="de")
    p.add_argument("--search-path", action="append", help="folder to search for .mo files (repeatable)")

    p = sub.add_parser("train-teacher", help="train a model with label-smoothed CE")
    _add_training_args(p, "tiny-teacher")

    p = sub.add_parser("distill", help="train a student: --kd none | word | a2d")
    _add_training_args(p, "tiny-student")
    p.add_argument("--teacher", help="teacher checkpoint (needed for --kd word/a2d)")
    p.add_argument("--teacher-preset", choices=sorted(PRESETS), help="check the teacher against this preset")
    p.add_argument("--kd", default="a2d", choices=["none", "word", "a2d"])
    p.add_argument("--alpha", type=float, default=0.5, help="word-KD weight")
    p.add_argument("--beta", type=float, default=1.0, help="attention-loss weight")
    p.add_argument("--decay", type=float, default=0.9, help="attention-loss decay per epoch")
    p.add_argument("--a2d-decay-every", type=float, default=0.0, metavar="N",
                   help="apply --decay once per N updates instead of per epoch (0: per epoch, as released); "
                        "N = planned updates / 100 follows the release's 100-epoch schedule in a short run")
    p.add_argument("--no-decoder-self", action="store_true", help="do not distill decoder self-attention")
    p.add_argument("--no-decoder-cross", action="store_true", help="do not distill decoder cross-attention")
    p.add_argument("--a2d-mask", action="store_true", help="exclude padding from the A2D loss")
    p.add_argument("--a2d-normalize", default="map", choices=["map", "row"])
    p.add_argument("--a2d-backend", default="auto", choices=BACKEND_NAMES)
    p.add_argument("--a2d-qk", action="store_true",
                   help="QK mode: attention runs scaled_dot_product_attention and the A2D loss is computed "
                        "from queries and keys (no maps in memory); needs --a2d-mask, same loss")

    p = sub.add_parser("translate", help="translate a file, one sentence per line")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--beam", type=int, default=5, help="1 = greedy")
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("evaluate", help="BLEU and chrF (sacrebleu, detokenized) on a split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--beam", type=int, default=5, help="1 = greedy")
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", help="scores JSON (default: next to the checkpoint)")
    p.add_argument("--hypotheses", help="write the translations here")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("demo", help="the whole pipeline on the embedded corpus, tiny presets")
    p.add_argument("--run-dir", default="runs/demo", help="output folder")
    p.add_argument("--minutes", type=float, default=12.0,
                   help="training time of all stages together (corpus and scoring come on top)")
    p.add_argument("--target-lang", default="de")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("compare", help="teacher vs no-KD, word-KD and A2D students over seeds (e.g. the release's "
                                       "presets on a GPU)")
    p.add_argument("--plan", default="release", choices=sorted(PLANS), help="presets and training options")
    p.add_argument("--run-dir", default="runs/compare", help="output folder")
    p.add_argument("--minutes", type=float, required=True,
                   help="training time of all waves together (corpus and scoring come on top)")
    p.add_argument("--seeds", default="1", help="comma-separated student seeds (the teacher uses the first)")
    p.add_argument("--parallel", type=int, default=1, help="student runs at once, each in its own process")
    p.add_argument("--data", help="prebuilt corpus folder (default: RUN_DIR/data, built from the catalogs)")
    p.add_argument("--target-lang", default="de")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--eval-sentences", type=int, help="test sentences scored per model (default: the plan's)")
    p.add_argument("--a2d-backend", default="auto", choices=BACKEND_NAMES)
    p.add_argument("--device", default="auto")
    return parser


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _seeds(text: str) -> List[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, e.g. 1,2,3; got {text!r}") from None


def run(args) -> int:
    from pathlib import Path

    if args.command == "corpus":
        from .corpus import build_corpus

        info = build_corpus(args.out, target_lang=args.target_lang, search_paths=args.search_path)
        print(f"wrote {info.out_dir}: " + ", ".join(f"{k} {v}" for k, v in info.counts.items())
              + f" pairs from {len(info.catalogs)} catalogs")
    elif args.command in ("train-teacher", "distill"):
        from .train import train

        extra = {"kd": "none"}
        if args.command == "distill":
            extra = dict(kd=args.kd, teacher=args.teacher, teacher_preset=args.teacher_preset, alpha=args.alpha,
                         beta=args.beta, decay=args.decay, a2d_decay_every=args.a2d_decay_every,
                         decoder_self=not args.no_decoder_self,
                         decoder_cross=not args.no_decoder_cross, a2d_mask=args.a2d_mask,
                         a2d_normalize=args.a2d_normalize, a2d_backend=args.a2d_backend, a2d_qk=args.a2d_qk)
        summary = train(_training_config(args, **extra))
        print(json.dumps(summary))
    elif args.command == "translate":
        from . import atomic
        from .train import load_model
        from .translate import read_sentences, translate_sentences

        device = _device(args.device)
        sentences = read_sentences(args.input)
        model, tokenizer, _ = load_model(args.checkpoint, device=device)
        out = translate_sentences(model, tokenizer, sentences, beam=args.beam, batch_size=args.batch_size,
                                  length_penalty=args.lenpen, device=device)
        atomic.write_lines(args.output, out)
        print(f"wrote {len(out)} translations to {args.output}")
    elif args.command == "evaluate":
        from .evaluate import evaluate_checkpoint

        output = args.output or str(Path(args.checkpoint).with_suffix(f".{args.split}.json"))
        result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, beam=args.beam,
                                     length_penalty=args.lenpen, batch_size=args.batch_size, output=output,
                                     hypotheses_out=args.hypotheses, device=_device(args.device))
        print(f"BLEU {result['bleu']:.2f}  chrF {result['chrf']:.2f}  ({result['sentences']} sentences, "
              f"{result['bleu_signature']}); wrote {output}")
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(args.run_dir, minutes=args.minutes, target_lang=args.target_lang, beam=args.beam, seed=args.seed,
                 device=_device(args.device))
    elif args.command == "compare":
        from .compare import run_comparison

        run_comparison(PLANS[args.plan], args.run_dir, minutes=args.minutes, seeds=_seeds(args.seeds),
                       parallel=args.parallel, data_dir=args.data, target_lang=args.target_lang, beam=args.beam,
                       device=_device(args.device), eval_sentences=args.eval_sentences,
                       a2d_backend=args.a2d_backend)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        # Bad input (the data layer's CorpusError is a ValueError): one clear line, no traceback.
        print(f"a2d-train {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
