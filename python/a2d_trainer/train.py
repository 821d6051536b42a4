"""Training loop for teachers and (distilled) students.

One function, :func:`train`, runs every kind of run: a teacher or a plain student
(``kd="none"``), a word-KD student (``"word"``) and an A2D student (``"a2d"``).

What it guarantees:

* Exact resume. A checkpoint holds the model, the A2D mixers, optimizer, LR schedule,
  every RNG state (torch, CUDA, Python, NumPy; one set per rank), the epoch, the update
  count and the data position (index of the next micro-batch in the epoch's
  deterministic batch order). ``resume=True`` continues bit for bit where the
  checkpoint left off.
* Split-invariant updates. The CE and word-KD sums of an update are divided by its
  non-pad token count over every rank and micro-batch, so N processes with
  ``update_freq=1`` compute the same update as one process with ``update_freq=N``.
* Multi-process training under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU); rank 0
  writes the checkpoints, logs and plots.
* Nothing partial: every file is written to a temporary name and renamed into place.

Outputs in ``run_dir``: ``checkpoint_last.pt``, ``checkpoint_best.pt`` (lowest
validation NLL), ``spm.model`` (the tokenizer), ``log.jsonl`` and ``learning_curves.png``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from a2d_kernels.distill import A2DDistiller

from . import atomic
from .model import ModelConfig, Seq2SeqTransformer, build_model, resolve_config
from .objective import KD_MODES, DistillationObjective, label_smoothed_nll_sum

CHECKPOINT_FORMAT = "a2d-train-checkpoint/1"
# TrainConfig fields that shape the run's trajectory (data order, updates, objective):
# a resume must keep them, or it would silently continue a different run. The others
# (limits, logging, device, backend, paths) may change between invocations.
RESUME_FIXED_FIELDS = ("seed", "max_len", "max_tokens", "update_freq", "lr", "warmup_updates",
                       "warmup_init_lr", "weight_decay", "clip_norm", "label_smoothing", "dropout", "amp",
                       "kd", "alpha", "beta", "decay", "a2d_decay_every", "decoder_self", "decoder_cross",
                       "a2d_mask", "a2d_normalize", "a2d_qk")
TOKENIZER_FILE = "spm.model"
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"


@dataclass
class TrainConfig:
    """Everything a run depends on (stored in its checkpoints)."""

    data_dir: str
    run_dir: str
    preset: str = "tiny-teacher"
    tokenizer: Optional[str] = None   # sentencepiece model; None: the teacher's, or train one
    vocab_size: int = 4000            # when a tokenizer is trained
    max_len: int = 128                # subword tokens per sentence (data layer's limit)
    max_tokens: int = 4096            # token budget of one micro-batch
    update_freq: int = 1              # micro-batches accumulated per optimizer update
    lr: float = 5e-4
    warmup_updates: int = 4000
    warmup_init_lr: float = 1e-7
    weight_decay: float = 0.0
    clip_norm: float = 0.0            # 0: no clipping
    label_smoothing: float = 0.1
    dropout: Optional[float] = None   # overrides the preset's dropout
    max_epochs: int = 0               # 0: no limit (some limit must be set)
    max_steps: int = 0                # optimizer updates; 0: no limit
    time_budget: float = 0.0          # seconds of training in this invocation; 0: no limit
    seed: int = 1
    save_every: int = 0               # updates between checkpoints; 0: end of epoch only
    log_every: int = 10
    amp: str = "auto"                 # "auto" (bf16 on CUDA), "bf16", "off"
    device: str = "auto"
    threads: int = 0                  # CPU threads for torch; 0: torch's default
    kd: str = "none"
    teacher: Optional[str] = None     # teacher checkpoint
    teacher_preset: Optional[str] = None  # checked against the teacher checkpoint
    alpha: float = 0.5
    beta: float = 1.0
    decay: float = 0.9
    a2d_decay_every: float = 0.0      # attention-weight decay clock: 0 per epoch (release); N > 0 per N updates
    decoder_self: bool = True
    decoder_cross: bool = True
    a2d_mask: bool = False
    a2d_normalize: str = "map"
    a2d_backend: str = "auto"
    a2d_qk: bool = False              # QK mode: SDPA attention, A2D loss from queries and keys
    resume: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.kd not in KD_MODES:
            raise ValueError(f"kd must be one of {KD_MODES}, got {self.kd!r}")
        if self.kd != "none" and not self.teacher:
            raise ValueError(f"kd={self.kd!r} needs a teacher checkpoint (teacher=...)")
        resolve_config(self.preset)
        if self.teacher_preset is not None:
            resolve_config(self.teacher_preset)
        for name in ("max_tokens", "update_freq", "max_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_epochs", "max_steps", "time_budget", "save_every", "warmup_updates", "clip_norm",
                     "threads", "a2d_decay_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.max_epochs or self.max_steps or self.time_budget):
            raise ValueError("set a stopping condition: max_epochs, max_steps or time_budget must be > 0")
        if self.a2d_qk:
            if self.kd != "a2d":
                raise ValueError(f"a2d_qk (QK mode) needs kd='a2d', got kd={self.kd!r}")
            if not self.a2d_mask:
                raise ValueError("a2d_qk (QK mode) computes the padding-masked A2D loss; set a2d_mask too "
                                 "(--a2d-mask): the unmasked loss keeps padded keys, which QK mode cannot")
            if self.a2d_backend == "cuda":
                raise ValueError("a2d_backend='cuda' has no QK mode; use 'auto', 'triton' or 'reference' "
                                 "with a2d_qk")
        if self.a2d_decay_every and self.kd != "a2d":
            raise ValueError(f"a2d_decay_every sets the A2D attention term's decay clock; it needs kd='a2d', "
                             f"got kd={self.kd!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")


# ----------------------------------------------------------------------------- processes


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: List[float]) -> List[float]:
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: str) -> DistContext:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world <= 1:
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return DistContext(device=dev)
    rank = int(os.environ["RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, device=dev, owns_group=owns)


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoints


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load a trainer checkpoint, with a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated or not a torch file
        raise ValueError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not an a2d-train checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def load_model(path, preset: Optional[str] = None, device="cpu") -> Tuple[Seq2SeqTransformer, object, dict]:
    """``(model in eval mode, tokenizer, checkpoint dict)`` from a checkpoint.

    ``preset``: when given, the checkpoint's architecture must equal that preset's,
    else a ValueError names every differing field.
    """
    from .data import Tokenizer

    path = Path(path)
    ckpt = read_checkpoint(path)
    config = ModelConfig.from_dict(ckpt["model_config"])
    if preset is not None:
        expected = resolve_config(preset).architecture()
        got = config.architecture()
        diff = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
        if diff:
            details = ", ".join(f"{k}={g} (preset has {e})" for k, (g, e) in diff.items())
            raise ValueError(f"checkpoint {path} does not match preset {preset!r}: it has {details}")
    model = Seq2SeqTransformer(config, ckpt["vocab_size"], pad_id=ckpt["pad_id"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path}: weights do not fit its own config {config}: {exc}") from exc
    tok_path = path.parent / ckpt["tokenizer"]
    if not tok_path.is_file():
        raise FileNotFoundError(f"checkpoint {path} needs its tokenizer {tok_path}, which does not exist")
    tokenizer = Tokenizer.load(str(tok_path))
    if tokenizer.vocab_size != ckpt["vocab_size"]:
        raise ValueError(f"tokenizer {tok_path} has {tokenizer.vocab_size} pieces but checkpoint {path} "
                         f"was trained with {ckpt['vocab_size']}")
    model.to(device).eval()
    return model, tokenizer, ckpt


# ----------------------------------------------------------------------------- training


class _StudentStep(nn.Module):
    """The trainable part of one step (student + A2D mixers): what DDP wraps."""

    def __init__(self, student: Seq2SeqTransformer, objective: DistillationObjective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, batch, denominator, epoch, teacher_logits=None, teacher_attn=None):
        logits, attn = self.student(batch.src, batch.tgt_in, batch.src_padding_mask, batch.tgt_padding_mask,
                                    **self.objective.attention_request(training=epoch is not None))
        out = self.objective(logits, batch.tgt_out, batch.tgt_padding_mask, denominator,
                             src_padding_mask=batch.src_padding_mask, student_attn=attn,
                             teacher_logits=teacher_logits, teacher_attn=teacher_attn, epoch=epoch)
        return out.loss, out.parts


def inverse_sqrt_factor(lr: float, warmup: int, init_lr: float):
    """LR multiplier per update: linear warm-up from ``init_lr`` to ``lr``, then
    ``lr * sqrt(warmup / step)`` (fairseq's ``inverse_sqrt``)."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (init_lr + (lr - init_lr) * step / warmup) / lr
        return math.sqrt(max(warmup, 1) / max(step, 1)) if warmup else 1.0

    return factor


def _autocast(ctx: DistContext, amp: str):
    use = amp == "bf16" or (amp == "auto" and ctx.device.type == "cuda")
    if use:
        return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=ctx.device.type, enabled=False)


def _prepare_tokenizer(cfg: TrainConfig, ctx: DistContext, train_pairs, teacher_tokenizer):
    """The run's tokenizer, copied to ``run_dir/spm.model`` so the run folder is whole.

    ``teacher_tokenizer``: the teacher's (``load_model``'s), or None without a teacher.
    """
    from .data import Tokenizer

    run_dir = Path(cfg.run_dir)
    target = run_dir / TOKENIZER_FILE
    teachers = None if teacher_tokenizer is None else teacher_tokenizer.model_path
    source = Path(cfg.tokenizer) if cfg.tokenizer else teachers
    if ctx.is_main:
        if source is not None:
            if not source.is_file():
                raise FileNotFoundError(f"tokenizer {source} does not exist")
            if teachers is not None and source != teachers and \
                    Tokenizer.load(source).pieces() != teacher_tokenizer.pieces():
                # KD compares the two models' distributions id by id: one vocabulary.
                raise ValueError(f"tokenizer {source} is not the teacher's ({teachers}): distillation compares "
                                 f"the two models' token distributions id by id, so the student needs the "
                                 f"teacher's tokenizer; leave --tokenizer out to use it")
            if source.resolve() != target.resolve():
                with atomic.atomic_path(target) as tmp:
                    shutil.copyfile(source, tmp)
        elif not (cfg.resume and target.is_file()):
            texts = [s for pair in train_pairs for s in pair]
            prefix = run_dir / ".spm_training"
            trained = Tokenizer.train(texts, str(prefix), cfg.vocab_size)
            with atomic.atomic_path(target) as tmp:
                shutil.copyfile(trained.model_path, tmp)
            for leftover in run_dir.glob(".spm_training*"):
                leftover.unlink()
    ctx.barrier()
    return Tokenizer.load(str(target))


def _load_teacher(cfg: TrainConfig, device) -> Tuple[Seq2SeqTransformer, object]:
    """The frozen teacher, checked against ``cfg.teacher_preset`` when one is given, and
    its tokenizer."""
    teacher, tokenizer, _ = load_model(cfg.teacher, preset=cfg.teacher_preset, device=device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, tokenizer


class _Logger:
    """JSONL log (rank 0), appended to across resumes."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _trim_log(path: Path, step: int) -> None:
    """Drop the records of updates after ``step`` (the checkpoint resumed from), and the
    partial train records a stop wrote.

    A run killed between two checkpoints has logged updates that the resumed run
    does again; without this the log (and its plot) would hold them twice. A stop
    between two log points writes a record over the updates since the last one; the
    checkpoint keeps those updates' sums, so the resumed run writes the full record at
    the next log point, as an uninterrupted run would.
    """
    if not path.is_file():
        return

    def before(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by the kill
            return False
        return record.get("step", 0) <= step and not record.get("partial", False)

    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if before(line)]
    if len(kept) != len(lines):
        atomic.write_lines(path, kept)


def plot_learning_curves(log_path, png_path) -> None:
    """Two panels from ``log.jsonl``: the training objective (with the A2D term, a sum,
    it lives on another scale) and the per-token NLL, training and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objective, train_nll, valid_nll = [], [], []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "train":
                objective.append((rec["step"], rec["loss"]))
                train_nll.append((rec["step"], rec["nll"]))
            elif rec.get("kind") == "valid":
                valid_nll.append((rec["step"], rec["nll"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if objective:
        left.plot(*zip(*objective), label="training objective")
        right.plot(*zip(*train_nll), label="train NLL / token")
    if valid_nll:
        right.plot(*zip(*valid_nll), "o-", label="valid NLL / token")
    for ax in (left, right):
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    with atomic.atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


@torch.no_grad()
def validate(module: _StudentStep, batches, ctx: DistContext, amp: str) -> Dict[str, float]:
    """Student NLL and label-smoothed CE per target token over the validation set."""
    was_training = module.training
    module.eval()
    sums = [0.0, 0.0, 0.0]
    for batch in batches:
        batch = batch.to(ctx.device)
        with _autocast(ctx, amp):
            logits, _ = module.student(batch.src, batch.tgt_in, batch.src_padding_mask, batch.tgt_padding_mask)
        ce, nll = label_smoothed_nll_sum(logits, batch.tgt_out, ~batch.tgt_padding_mask,
                                         module.objective.label_smoothing)
        sums[0] += float(nll)
        sums[1] += float(ce)
        sums[2] += batch.ntokens
    module.train(was_training)
    nll, ce, ntok = ctx.all_reduce_sum(sums)
    ntok = max(ntok, 1.0)
    return {"nll": nll / ntok, "ce": ce / ntok, "ppl": math.exp(min(nll / ntok, 50.0)), "tokens": int(ntok)}


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; return a summary (steps, epoch, best validation NLL, paths)."""
    from .corpus import read_parallel
    from .data import batches_by_tokens, check_token_budget, encode_pairs

    cfg.validate()
    if cfg.threads:
        # On a busy machine one thread per process avoids OpenMP barrier stalls that
        # make small CPU kernels several times slower.
        torch.set_num_threads(cfg.threads)
    ctx = setup_distributed(cfg.device)
    try:
        return _train(cfg, ctx, read_parallel, batches_by_tokens, encode_pairs, check_token_budget)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _train(cfg, ctx, read_parallel, batches_by_tokens, encode_pairs, check_token_budget) -> dict:
    # Check every input (data, teacher) before the first file is written.
    data_dir = Path(cfg.data_dir)
    train_pairs = read_parallel(data_dir / "train.src", data_dir / "train.tgt")
    valid_pairs = read_parallel(data_dir / "valid.src", data_dir / "valid.tgt")
    teacher = teacher_tokenizer = None
    if cfg.kd != "none":
        teacher, teacher_tokenizer = _load_teacher(cfg, ctx.device)
    run_dir = Path(cfg.run_dir)
    if not cfg.resume and (run_dir / LAST).exists():
        raise ValueError(f"run_dir {run_dir} already holds a run ({LAST}); resume it (--resume) "
                         f"or choose another run_dir")
    # The tokenizer needs a home before the data can be checked against the token
    # budget; a run folder this call created is removed again if that check fails.
    created = ctx.is_main and not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        # With a teacher, the pieces are the teacher's (checked there), so its vocabulary fits.
        tokenizer = _prepare_tokenizer(cfg, ctx, train_pairs, teacher_tokenizer)
        train_data = encode_pairs(train_pairs, tokenizer, cfg.max_len)
        valid_data = encode_pairs(valid_pairs, tokenizer, cfg.max_len)
        for split, data in (("train", train_data), ("valid", valid_data)):
            check_token_budget(data, cfg.max_tokens, f"{data_dir / split}.src")
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise

    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    seed_everything(cfg.seed)
    model_config = resolve_config(cfg.preset)
    if cfg.dropout is not None:
        model_config = dataclasses.replace(model_config, dropout=cfg.dropout)
    student = build_model(model_config, tokenizer.vocab_size, pad_id=tokenizer.pad_id).to(ctx.device)

    distiller = None
    if cfg.kd == "a2d":
        # The encoder's self-attention is always distilled; the decoder kinds are flags.
        kinds = ("encoder",) + (("decoder_self",) if cfg.decoder_self else ()) + (
            ("decoder_cross",) if cfg.decoder_cross else ())
        distiller = A2DDistiller(model_config.heads_per_kind(), teacher.config.heads_per_kind(), kinds=kinds,
                                 beta=cfg.beta, decay=cfg.decay, normalize=cfg.a2d_normalize,
                                 backend=cfg.a2d_backend)
    objective = DistillationObjective(cfg.kd, cfg.alpha, cfg.label_smoothing, distiller, cfg.a2d_mask,
                                      a2d_qk=cfg.a2d_qk)
    # QK mode: both models run fused attention and hand the loss queries and keys.
    student.attn_impl = objective.attention_impl
    if teacher is not None:
        teacher.attn_impl = objective.attention_impl
    module = _StudentStep(student, objective).to(ctx.device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, inverse_sqrt_factor(cfg.lr, cfg.warmup_updates, cfg.warmup_init_lr))

    epoch, batch_index, step, best_valid = 1, 0, 0, float("inf")
    last_path, best_path = run_dir / LAST, run_dir / BEST
    window = _Window()  # the updates since the last train record; checkpointed with the run
    resumed = False
    if cfg.resume and last_path.is_file():
        ckpt = read_checkpoint(last_path)
        stored = ModelConfig.from_dict(ckpt["model_config"])
        if stored.architecture() != model_config.architecture():
            raise ValueError(f"cannot resume {last_path}: it holds a {stored.architecture()} model, "
                             f"preset {cfg.preset!r} is {model_config.architecture()}")
        if ckpt["kd"] != cfg.kd:
            raise ValueError(f"cannot resume {last_path}: it was trained with kd={ckpt['kd']!r}, not {cfg.kd!r}")
        changed = _changed_fields(ckpt.get("train_config"), cfg)
        if changed:
            raise ValueError(f"cannot resume {last_path}: the run was started with "
                             f"{', '.join(f'{k}={old!r}' for k, old, _ in changed)}, this call sets "
                             f"{', '.join(f'{k}={new!r}' for k, _, new in changed)}; resume with the run's "
                             f"settings or start a new run_dir")
        try:
            student.load_state_dict(ckpt["model"])
            objective.load_state_dict(ckpt["objective"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot resume {last_path}: its state does not fit this run: {exc}") from exc
        epoch, batch_index, step = ckpt["epoch"], ckpt["batch_index"], ckpt["step"]
        best_valid = ckpt["best_valid"]
        rng = ckpt["rng"]
        if len(rng) == ctx.world_size:
            restore_rng(rng[ctx.rank])
            window.load_state(ckpt.get("log_window", [None] * ctx.world_size)[ctx.rank])
        else:  # a different process count cannot replay the same random streams
            seed_everything(cfg.seed + 1000 * step + ctx.rank)
        resumed = True
        finished = _finished(cfg, epoch, step)
        if finished:  # resuming a finished run: leave its checkpoints and log as they are
            return _summary(step, epoch, best_valid, finished, last_path, best_path, run_dir)

    ddp = module
    if ctx.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(
            module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    if ctx.is_main:
        if not resumed:  # a fresh run starts a fresh log
            (run_dir / "log.jsonl").unlink(missing_ok=True)
        else:
            _trim_log(run_dir / "log.jsonl", step)
    logger = _Logger(run_dir / "log.jsonl", ctx.is_main)
    logger.write({"kind": "start", "resumed": resumed, "step": step, "epoch": epoch, "world_size": ctx.world_size,
                  "config": dataclasses.asdict(cfg), "model_config": model_config.to_dict(),
                  "train_pairs": len(train_data), "valid_pairs": len(valid_data)})

    def save(path: Path, next_epoch: int, next_batch: int) -> None:
        mine = (capture_rng(), window.state())  # per rank: its random streams and unlogged sums
        per_rank = [mine]
        if ctx.world_size > 1:
            per_rank = [None] * ctx.world_size
            dist.all_gather_object(per_rank, mine)
        if not ctx.is_main:
            return
        rng, log_window = [r for r, _ in per_rank], [w for _, w in per_rank]
        atomic.torch_save({
            "format": CHECKPOINT_FORMAT, "model_config": model_config.to_dict(), "preset": cfg.preset,
            "vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "tokenizer": TOKENIZER_FILE,
            "kd": cfg.kd, "model": student.state_dict(), "objective": objective.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
            "epoch": next_epoch, "batch_index": next_batch, "step": step, "best_valid": best_valid,
            "log_window": log_window, "train_config": dataclasses.asdict(cfg),
        }, path)

    # Every validation sentence counts (equal_shards=False): validate() meets the other
    # ranks only in its final all-reduce, so the shards need not be equal.
    valid_batches = batches_by_tokens(valid_data, cfg.max_tokens, shuffle=False, seed=cfg.seed, epoch=1,
                                      rank=ctx.rank, world_size=ctx.world_size, equal_shards=False)

    def log_train(a2d_epoch: int, partial: bool = False) -> None:
        """The train record of the updates since the last one. ``partial``: a stop between
        two log points; the window is kept (and checkpointed) so a resume completes it."""
        record = {"kind": "train", "step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                  **_a2d_weight(objective, a2d_epoch), **window.flush(ctx, reset=not partial)}
        logger.write(dict(record, partial=True) if partial else record)

    def run_validation(next_epoch: int, next_batch: int) -> None:
        """Validate after the updates of epoch ``epoch``; checkpoint the position after them."""
        nonlocal best_valid
        scores = validate(module, valid_batches, ctx, cfg.amp)
        logger.write({"kind": "valid", "step": step, "epoch": epoch, **scores})
        if scores["nll"] < best_valid:
            best_valid = scores["nll"]
            save(best_path, next_epoch, next_batch)
        save(last_path, next_epoch, next_batch)
        if ctx.is_main:
            plot_learning_curves(run_dir / "log.jsonl", run_dir / "learning_curves.png")

    start = time.monotonic()
    stop_reason = None
    module.train()
    while stop_reason is None:
        stop_reason = _finished(cfg, epoch, step)
        if stop_reason:
            break
        batches = batches_by_tokens(train_data, cfg.max_tokens, shuffle=True, seed=cfg.seed, epoch=epoch,
                                    rank=ctx.rank, world_size=ctx.world_size)
        starts = list(range(batch_index, len(batches), cfg.update_freq))
        bar = _progress(len(starts), epoch, enabled=cfg.progress and ctx.is_main)
        for first in starts:
            group = batches[first:first + cfg.update_freq]
            a2d_epoch = decay_epoch(epoch, step, cfg.a2d_decay_every)
            stats = _update(ddp, module, teacher, objective, group, optimizer, scheduler, ctx, cfg, a2d_epoch)
            step += 1
            batch_index = first + len(group)
            window.add(stats)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{window.tokens_per_s():.0f}")
            if step % cfg.log_every == 0:
                log_train(a2d_epoch)
            if cfg.save_every and step % cfg.save_every == 0:
                save(last_path, epoch, batch_index)
            stop_reason = _should_stop(cfg, ctx, epoch, step, start)
            if stop_reason:
                break
        if bar is not None:
            bar.close()
        if stop_reason is None:  # the epoch is complete
            run_validation(epoch + 1, 0)
            epoch, batch_index = epoch + 1, 0
        else:
            if window.updates:
                log_train(a2d_epoch, partial=True)
            if batch_index >= len(batches):
                run_validation(epoch + 1, 0)
                epoch, batch_index = epoch + 1, 0
            else:
                run_validation(epoch, batch_index)
    logger.write({"kind": "stop", "reason": stop_reason, "step": step, "epoch": epoch,
                  "seconds": round(time.monotonic() - start, 2)})
    return _summary(step, epoch, best_valid, stop_reason, last_path, best_path, run_dir)


def _finished(cfg: TrainConfig, epoch: int, step: int) -> Optional[str]:
    """The limit a run at (epoch, step) has already reached, if any."""
    if cfg.max_steps and step >= cfg.max_steps:
        return "max_steps"
    if cfg.max_epochs and epoch > cfg.max_epochs:
        return "max_epochs"
    return None


def _summary(step, epoch, best_valid, stop_reason, last_path, best_path, run_dir) -> dict:
    return {"steps": step, "epoch": epoch, "best_valid_nll": best_valid, "stop_reason": stop_reason,
            "checkpoint": str(last_path), "best_checkpoint": str(best_path), "run_dir": str(run_dir)}


def _changed_fields(stored: Optional[dict], cfg: TrainConfig) -> List[Tuple[str, object, object]]:
    """``(field, stored value, new value)`` for each RESUME_FIXED_FIELDS entry that differs."""
    if stored is None:
        return []
    now = dataclasses.asdict(cfg)
    return [(k, stored[k], now[k]) for k in RESUME_FIXED_FIELDS if k in stored and stored[k] != now[k]]


def _a2d_weight(objective, a2d_epoch: int) -> dict:
    """``{"a2d_weight": w}``: the attention term's weight at that decay epoch, for the log."""
    if objective.distiller is None:
        return {}
    return {"a2d_weight": objective.distiller.weight_at(a2d_epoch)}


def decay_epoch(epoch: int, step: int, every: float) -> int:
    """The epoch the attention term's weight ``beta * decay**(epoch - 1)`` is taken at.

    ``every == 0``: the data epoch, as the release does. ``every > 0``: the clock ticks
    once per ``every`` updates (``step`` = updates done so far), so a run of U updates
    can follow the release's schedule shape with ``every = U / E`` for the release's E
    epochs. Why this exists: the release trains ~100 epochs of ~1100 updates, over which
    the weight averages ~0.1; a run of a few hundred updates never leaves epoch 1-2 and
    keeps the term at full weight, where its gradient measured 4-7x that of CE + word-KD
    (README, "Trainer").
    """
    return epoch if not every else 1 + int(step // every)


def _update(ddp, module, teacher, objective, group, optimizer, scheduler, ctx, cfg, epoch) -> dict:
    """One optimizer update over ``group`` (this rank's micro-batches); ``epoch`` is the
    attention term's decay epoch (``decay_epoch``)."""
    local_tokens = sum(b.ntokens for b in group)
    denominator = ctx.all_reduce_sum([float(local_tokens)])[0] if ctx.world_size > 1 else float(local_tokens)
    t0 = time.monotonic()
    sums: Dict[str, float] = {}
    loss_total = 0.0
    for i, batch in enumerate(group):
        batch = batch.to(ctx.device)
        teacher_logits = teacher_attn = None
        if teacher is not None:
            with torch.no_grad(), _autocast(ctx, cfg.amp):
                teacher_logits, teacher_attn = teacher(batch.src, batch.tgt_in, batch.src_padding_mask,
                                                       batch.tgt_padding_mask, **objective.attention_request())
        sync = ctx.world_size == 1 or i == len(group) - 1
        context = ddp.no_sync() if not sync else contextlib.nullcontext()
        with context:
            with _autocast(ctx, cfg.amp):
                loss, parts = ddp(batch, denominator, epoch, teacher_logits, teacher_attn)
            # DDP averages gradients over ranks; scaling by world_size turns that into the sum.
            (loss * ctx.world_size).backward()
        loss_total += float(loss.detach())
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if cfg.clip_norm:
        nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], cfg.clip_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_total, "tokens": local_tokens, "seconds": time.monotonic() - t0, "sums": sums}


class _Window:
    """Running sums between two log records; losses are reported per target token."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.updates, self.tokens, self.seconds, self.loss = 0, 0, 0.0, 0.0
        self.sums: Dict[str, float] = {}

    def add(self, stats: dict) -> None:
        self.updates += 1
        self.tokens += stats["tokens"]
        self.seconds += stats["seconds"]
        self.loss += stats["loss"]
        for k, v in stats["sums"].items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def state(self) -> dict:
        return {"updates": self.updates, "tokens": self.tokens, "seconds": self.seconds, "loss": self.loss,
                "sums": dict(self.sums)}

    def load_state(self, state: Optional[dict]) -> None:
        """Continue from ``state()``; None (a checkpoint from before windows were saved): empty."""
        self.reset()
        if state:
            self.updates, self.tokens, self.seconds, self.loss = (
                state["updates"], state["tokens"], state["seconds"], state["loss"])
            self.sums = dict(state["sums"])

    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def flush(self, ctx: DistContext, reset: bool = True) -> dict:
        keys = sorted(self.sums)
        reduced = ctx.all_reduce_sum([self.loss, float(self.tokens)] + [self.sums[k] for k in keys])
        loss, tokens, values = reduced[0], reduced[1], reduced[2:]
        record = {"loss": loss / self.updates, "tokens": int(tokens),
                  "tokens_per_s": round(tokens / self.seconds, 1) if self.seconds else 0.0}
        for k, v in zip(keys, values):
            # per token for the CE/KD sums; the attention term is a per-batch sum already
            record[k] = v / self.updates if k.startswith("attn") else v / max(tokens, 1.0)
        if reset:
            self.reset()
        return record


def _progress(total: int, epoch: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", unit="upd", leave=False, dynamic_ncols=True)


def _should_stop(cfg: TrainConfig, ctx: DistContext, epoch: int, step: int, start: float) -> Optional[str]:
    """After an update: a limit reached, or this invocation's time budget spent."""
    reason = _finished(cfg, epoch, step)
    if reason is None and cfg.time_budget:
        over = float(time.monotonic() - start >= cfg.time_budget)
        if ctx.world_size > 1:  # every rank must stop at the same update
            over = ctx.all_reduce_sum([over])[0]
        if over:
            reason = "time_budget"
    return reason
