"""Gradient-norm ratio of the CE+word-KD part vs the A2D attention part, on the student's
parameters, along a default A2D training run (the trainer's own modules; nothing edited).

It rebuilds what ``a2d_trainer.train._train`` builds for ``a2d-train distill --kd a2d``
(same seed, same batches, same optimizer, ``_update`` for every step), and at chosen steps
(before that update) evaluates, on a fixed probe of training batches in eval mode (no
dropout, no RNG consumed), the two gradients separately:

    g_ce   = d/d(student) [((1-alpha) CE + alpha KD) / ntokens]
    g_attn = d/d(student) [beta * decay**(epoch-1) * (L_enc + (L_dself + L_dcross)/2)]

It also probes, at each point, the variants (encoder-only, masked) on the same weights.

Usage: python gradnorm.py TEACHER_CKPT OUT_JSON [--steps 0,50,...] [--max-steps 360]
"""
import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from a2d_kernels.distill import A2DDistiller
from a2d_trainer.corpus import read_parallel
from a2d_trainer.data import batches_by_tokens, encode_pairs, Tokenizer
from a2d_trainer.model import build_model, resolve_config
from a2d_trainer.objective import DistillationObjective, label_smoothed_nll_sum, word_kd_sum
from a2d_trainer.train import (DistContext, TrainConfig, _StudentStep, _load_teacher, _update,
                               inverse_sqrt_factor, read_checkpoint, seed_everything)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("teacher")
    ap.add_argument("out")
    ap.add_argument("--data", default="data")
    ap.add_argument("--steps", default="0,25,50,100,200,300,359")
    ap.add_argument("--max-steps", type=int, default=360)
    ap.add_argument("--probe-batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg = TrainConfig(data_dir=args.data, run_dir="/tmp/a2d_study/runs/_gradnorm_unused", preset="tiny-student",
                      vocab_size=3000, max_len=64, max_tokens=2048, lr=1e-3, warmup_updates=100, max_epochs=1000,
                      log_every=10, save_every=0, clip_norm=1.0, threads=1, device="cpu", seed=args.seed,
                      kd="a2d", teacher=args.teacher, teacher_preset="tiny-teacher", progress=False)
    ctx = DistContext(device=torch.device("cpu"))
    data_dir = Path(cfg.data_dir)
    train_pairs = read_parallel(data_dir / "train.src", data_dir / "train.tgt")
    teacher, teacher_config = _load_teacher(cfg, ctx.device)
    ck = read_checkpoint(cfg.teacher)
    tokenizer = Tokenizer.load(str(Path(cfg.teacher).parent / ck["tokenizer"]))
    train_data = encode_pairs(train_pairs, tokenizer, cfg.max_len)

    # exactly _train's construction order (seed, student, distiller, objective, optimizer)
    seed_everything(cfg.seed)
    model_config = resolve_config(cfg.preset)
    student = build_model(model_config, tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    kinds_all = ("encoder", "decoder_self", "decoder_cross")
    distiller = A2DDistiller(model_config.heads_per_kind(), teacher_config.heads_per_kind(), kinds=kinds_all,
                             beta=cfg.beta, decay=cfg.decay, normalize=cfg.a2d_normalize, backend=cfg.a2d_backend)
    objective = DistillationObjective("a2d", cfg.alpha, cfg.label_smoothing, distiller, False)
    module = _StudentStep(student, objective)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, inverse_sqrt_factor(cfg.lr, cfg.warmup_updates, cfg.warmup_init_lr))

    # fixed probe: the first batches of epoch 1's order (training data the run sees)
    probe = batches_by_tokens(train_data, cfg.max_tokens, shuffle=True, seed=cfg.seed, epoch=1)[:args.probe_batches]
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    sparams = [p for p in student.parameters() if p.requires_grad]
    groups = {
        "embed": [i for i, n in enumerate(names) if "embed" in n],
        "enc_qk": [i for i, n in enumerate(names) if n.startswith("encoder") and ("q_proj" in n or "k_proj" in n)],
        "dec_qk": [i for i, n in enumerate(names) if n.startswith("decoder") and ("q_proj" in n or "k_proj" in n)],
        "other": [i for i, n in enumerate(names) if "embed" not in n and not ("q_proj" in n or "k_proj" in n)],
    }

    def probe_grads(epoch):
        """{variant: (g_ce list, g_attn list)} summed over the probe batches."""
        was = module.training
        module.eval()
        variants = {
            "default(enc+dec/2)": (kinds_all, False),
            "encoder-only": (("encoder",), False),
            "default+mask": (kinds_all, True),
        }
        res = {}
        g_ce = [torch.zeros_like(p) for p in sparams]
        g_at = {v: [torch.zeros_like(p) for p in sparams] for v in variants}
        vals = {v: 0.0 for v in variants}
        ce_val = 0.0
        for batch in probe:
            with torch.no_grad():
                t_logits, t_attn = teacher(batch.src, batch.tgt_in, batch.src_padding_mask, batch.tgt_padding_mask,
                                           need_attn=True)
            logits, attn = student(batch.src, batch.tgt_in, batch.src_padding_mask, batch.tgt_padding_mask,
                                   need_attn=True)
            valid = ~batch.tgt_padding_mask
            ce, _ = label_smoothed_nll_sum(logits, batch.tgt_out, valid, cfg.label_smoothing)
            kd = word_kd_sum(logits, t_logits, valid)
            part = ((1 - cfg.alpha) * ce + cfg.alpha * kd) / batch.ntokens
            ce_val += float(part)
            gs = torch.autograd.grad(part, sparams, retain_graph=True, allow_unused=True)
            for acc, g in zip(g_ce, gs):
                if g is not None:
                    acc += g
            for v, (kinds, mask) in variants.items():
                parts = {}
                m = {"src": batch.src_padding_mask if mask else None, "tgt": batch.tgt_padding_mask if mask else None}
                side_q = {"encoder": "src", "decoder_self": "tgt", "decoder_cross": "tgt"}
                side_k = {"encoder": "src", "decoder_self": "tgt", "decoder_cross": "src"}
                for k in kinds:
                    parts[k] = distiller.losses[k](attn[k], t_attn[k], key_padding_mask=m[side_k[k]],
                                                   query_mask=m[side_q[k]])
                total = distiller._combine(parts, epoch).total
                vals[v] += float(total)
                gs = torch.autograd.grad(total, sparams, retain_graph=True, allow_unused=True)
                for acc, g in zip(g_at[v], gs):
                    if g is not None:
                        acc += g
        module.train(was)

        def norm(gl, idx=None):
            idx = range(len(gl)) if idx is None else idx
            return math.sqrt(sum(float(gl[i].pow(2).sum()) for i in idx))

        def cos(a, b):
            dot = sum(float((x * y).sum()) for x, y in zip(a, b))
            return dot / max(norm(a) * norm(b), 1e-30)

        def frac_dominated(a, b):  # share of scalar params where |g_attn| > |g_ce|
            n = tot = 0
            for x, y in zip(a, b):
                n += int((y.abs() > x.abs()).sum())
                tot += x.numel()
            return n / tot

        nb = len(probe)
        res["ce_kd_value_per_batch"] = ce_val / nb
        res["ce_kd_gradnorm"] = norm(g_ce) / nb
        res["ce_kd_group_norms"] = {g: norm(g_ce, idx) / nb for g, idx in groups.items()}
        for v in variants:
            res[v] = {
                "attn_value_per_batch": vals[v] / nb,
                "attn_gradnorm": norm(g_at[v]) / nb,
                "ratio_attn_over_cekd": norm(g_at[v]) / max(norm(g_ce), 1e-30),
                "cosine": cos(g_ce, g_at[v]),
                "frac_params_attn_dominates": frac_dominated(g_ce, g_at[v]),
                "group_ratio": {g: norm(g_at[v], idx) / max(norm(g_ce, idx), 1e-30) for g, idx in groups.items()},
                "total_gradnorm": norm([a + b for a, b in zip(g_ce, g_at[v])]) / nb,
            }
        return res

    steps_to_probe = sorted(int(s) for s in args.steps.split(","))
    records = []
    step, epoch = 0, 1
    t0 = time.monotonic()
    module.train()
    done = False
    while not done:
        batches = batches_by_tokens(train_data, cfg.max_tokens, shuffle=True, seed=cfg.seed, epoch=epoch)
        for b in batches:
            if step in steps_to_probe:
                r = probe_grads(epoch)
                r.update(step=step, epoch=epoch, seconds=round(time.monotonic() - t0, 1))
                records.append(r)
                d = r["default(enc+dec/2)"]
                print(f"step {step} ep {epoch}: |g_cekd| {r['ce_kd_gradnorm']:.4f} |g_attn| {d['attn_gradnorm']:.4f} "
                      f"ratio {d['ratio_attn_over_cekd']:.2f} cos {d['cosine']:.3f} attn {d['attn_value_per_batch']:.2f} "
                      f"enc-only ratio {r['encoder-only']['ratio_attn_over_cekd']:.2f} "
                      f"mask ratio {r['default+mask']['ratio_attn_over_cekd']:.2f}", flush=True)
            if step >= args.max_steps:
                done = True
                break
            stats = _update(module, module, teacher, objective, [b], optimizer, scheduler, ctx, cfg, epoch)
            step += 1
            if step % 60 == 0:
                s = stats["sums"]
                print(f"  step {step} loss {stats['loss']:.3f} ce/tok {s['ce'] / stats['tokens']:.3f} "
                      f"attn {s['attn']:.3f}", flush=True)
        else:
            epoch += 1
    Path(args.out).write_text(json.dumps({"probe_batches": len(probe), "probe_ntokens": [b.ntokens for b in probe],
                                          "probe_B": [int(b.src.shape[0]) for b in probe],
                                          "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
