"""Prototype of a per-N-updates decay clock for the A2D weight, without editing the trainer:
runs `a2d-train distill ...` (same CLI, same args) with train._update wrapped so that the
epoch the objective sees is the virtual epoch 1 + floor(update / N) (N from A2D_DECAY_EVERY).
The attention weight is then beta * decay**floor(update / N); validation is unchanged (epoch None).
Usage: A2D_DECAY_EVERY=3.6 python distill_clock.py distill --data ... (the CLI's arguments)"""
import math, os, sys
import a2d_trainer.train as T
from a2d_trainer.cli import main

N = float(os.environ["A2D_DECAY_EVERY"])
_orig = T._update
_count = [0]

def _update(ddp, module, teacher, objective, group, optimizer, scheduler, ctx, cfg, epoch):
    virtual = 1 + math.floor(_count[0] / N)
    _count[0] += 1
    return _orig(ddp, module, teacher, objective, group, optimizer, scheduler, ctx, cfg, virtual)

T._update = _update
sys.exit(main(sys.argv[1:]))
