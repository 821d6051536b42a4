"""Distill a Marian teacher into a smaller Marian student with A2D, in plain PyTorch.

Nothing is downloaded: both models are built from ``MarianConfig`` (random init), and
the data is a generated toy translation task (the target is the reversed source), so
it runs on a laptop CPU in seconds. Swap in ``MarianMTModel.from_pretrained(...)`` and
a real tokenized corpus for actual use: the distillation lines stay the same.

The objective is the release's criterion (DESIGN.md section 1):
``(1 - alpha) * label_smoothed_CE + alpha * word_KD + beta * decay**(epoch - 1) * (L_enc + L_dec)``.

    pip install -e ".[hf]"
    python examples/hf_marian_distill.py --steps 20
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from a2d_kernels.distill import A2DDistiller

try:
    from transformers import MarianConfig, MarianMTModel
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise SystemExit(f"this example needs transformers: pip install -e \".[hf]\" ({exc})")

PAD, EOS, FIRST_WORD = 0, 1, 2  # Marian starts the decoder with the pad id


def marian(vocab_size: int, layers: int, heads: int, d_model: int, ffn: int) -> MarianMTModel:
    config = MarianConfig(
        vocab_size=vocab_size, d_model=d_model,
        encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=256,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        # SDPA and flash attention never materialize the maps A2D needs.
        attn_implementation="eager",
    )
    return MarianMTModel(config)


def toy_batch(batch_size: int, vocab_size: int, max_len: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Random sources of random lengths; the target is the reversed source plus EOS.

    Returns the Hugging Face batch: ``input_ids``/``attention_mask`` (1 = token) and
    ``labels`` (-100 = padding) with the ``decoder_attention_mask`` of the shifted
    decoder inputs, which marks exactly the label positions.
    """
    lengths = torch.randint(2, max_len + 1, (batch_size,), generator=generator)
    src = torch.full((batch_size, max_len), PAD)
    labels = torch.full((batch_size, max_len + 1), -100)
    for b, n in enumerate(lengths.tolist()):
        words = torch.randint(FIRST_WORD, vocab_size, (n,), generator=generator)
        src[b, :n] = words
        labels[b, :n] = words.flip(0)
        labels[b, n] = EOS
    return {"input_ids": src, "attention_mask": (src != PAD).long(),
            "labels": labels, "decoder_attention_mask": (labels != -100).long()}


def word_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over target tokens of KL(teacher || student) of the next-word distributions."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return per_token[keep].mean()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--steps-per-epoch", type=int, default=10, help="epoch length for the decay schedule")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=12)
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.5, help="word-KD weight")
    p.add_argument("--beta", type=float, default=1.0, help="A2D attention-loss weight")
    p.add_argument("--decay", type=float, default=0.9, help="per-epoch decay of beta")
    p.add_argument("--normalize", choices=("map", "row"), default="map")
    p.add_argument("--backend", choices=("auto", "reference", "triton", "cuda"), default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    # The release's shape ratio: the student has half the teacher's layers.
    teacher = marian(args.vocab_size, layers=4, heads=4, d_model=64, ffn=128).to(device).eval()
    student = marian(args.vocab_size, layers=2, heads=4, d_model=64, ffn=128).to(device).train()
    distiller = A2DDistiller.from_hf_configs(
        student.config, teacher.config, beta=args.beta, decay=args.decay,
        normalize=args.normalize, backend=args.backend,
    ).to(device)
    # The alignment module's 1x1 convolutions train with the student.
    optimizer = torch.optim.AdamW([*student.parameters(), *distiller.parameters()], lr=args.lr)

    generator = torch.Generator().manual_seed(args.seed)
    history = []
    for step in range(1, args.steps + 1):
        epoch = 1 + (step - 1) // args.steps_per_epoch
        batch = {k: v.to(device) for k, v in toy_batch(args.batch_size, args.vocab_size, args.max_len,
                                                        generator).items()}
        started = time.perf_counter()
        with torch.no_grad():
            t_out = teacher(**batch, output_attentions=True)
        s_out = student(**batch, output_attentions=True)

        keep = batch["labels"] != -100
        ce = F.cross_entropy(s_out.logits[keep].float(), batch["labels"][keep], label_smoothing=0.1)
        kd = word_kd(s_out.logits, t_out.logits, keep)
        attn = distiller.forward_hf(s_out, t_out, epoch=epoch, attention_mask=batch["attention_mask"],
                                    decoder_attention_mask=batch["decoder_attention_mask"])
        loss = (1 - args.alpha) * ce + args.alpha * kd + attn.total

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        record = {"step": step, "epoch": epoch, "loss": loss.item(), "ce": ce.item(), "word_kd": kd.item(),
                  "a2d": attn.total.item(), **{f"a2d_{k}": v.item() for k, v in attn.parts.items()},
                  "ms": 1e3 * (time.perf_counter() - started)}
        history.append(record)
        print(f"step {step:4d} epoch {epoch}  loss {record['loss']:.4f}  ce {record['ce']:.4f}  "
              f"word_kd {record['word_kd']:.4f}  a2d {record['a2d']:.4f} ("
              + ", ".join(f"{k} {v.item():.4f}" for k, v in attn.parts.items())
              + f")  {record['ms']:.0f} ms", flush=True)
    return history


if __name__ == "__main__":
    main()
