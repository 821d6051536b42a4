"""Write results.json here from summarize.py's outputs for seeds 1-5 (planned) and 1-8 (with extras).
usage (in the scratch folder): python summarize.py results_s1-5.json 5 > summary_s1-5.md
                               python summarize.py results_s1-8.json 8 > summary_s1-8.md
                               python merge_results.py"""
import json
import subprocess
from pathlib import Path

import torch

a = json.load(open("results_s1-8.json"))
b = json.load(open("results_s1-5.json"))
head = subprocess.check_output(["git", "-C", "/work/main", "rev-parse", "--short", "HEAD"]).decode().strip()
# The runs started at b8a76b4; commits landed during them (up to bf85cd4), none touching the code they ran.
commit = {"at_start": "b8a76b4", "at_merge": head,
          "note": "b8a76b4..bf85cd4 changed cli.py (new compare subcommand), compare.py (new), demo.py (refactor onto "
                  "compare.py); train.py, objective.py, model.py, data.py, evaluate.py, translate.py and a2d_kernels "
                  "were unchanged, so every run used the same training and scoring code"}
res = {"date": "2026-11-25", "machine": "2-core CPU (no GPU), shared with other sessions' jobs",
       "torch": torch.__version__, "commit": commit, "scratch": "/tmp/a2d_seeds",
       "settings": {"corpus": "a2d_trainer.cli corpus --out data (en->de, gettext catalogs)",
                    "common": "--data data --vocab-size 3000 --max-len 64 --max-tokens 2048 --lr 1e-3 "
                              "--warmup-updates 100 --max-epochs 1000 --log-every 10 --save-every 0 "
                              "--clip-norm 1.0 --device cpu --no-progress",
                    "teacher": "tiny-teacher, seed 1, --max-steps 1075 (the demo's update count; the demo's "
                               "302.4 s time budget gave 667 here), --threads 1",
                    "students": "tiny-student, 360 updates, --threads 1, word: --kd word; "
                                "a2d: --kd a2d --a2d-decay-every 3.6; none: --kd none",
                    "eval": "checkpoint_best.pt, test split, first 300 sentences, beam 4, sacrebleu BLEU and "
                            "chrF, 1 thread"},
       "planned_seeds": [1, 2, 3, 4, 5], "extra_seeds": [6, 7, 8],
       "extra_seeds_note": "word/A2D pairs for seeds 6-8 were added after seeds 1-5 were scored (time was "
                           "left); the planned analysis is seeds 1-5",
       "teacher": a["teacher"], "teacher_time302_unused": a.get("teacher_time302_unused"),
       "runs": a["runs"],
       "summary_seeds_1_5": {"per_variant": b["per_variant"], "paired": b["paired"]},
       "summary_seeds_1_8": {"per_variant": a["per_variant"], "paired": a["paired"]}}
Path(__file__).with_name("results.json").write_text(json.dumps(res, indent=1) + "\n")
