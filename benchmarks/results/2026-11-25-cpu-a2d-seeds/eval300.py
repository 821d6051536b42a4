"""Score RUN/checkpoint_best.pt on the first 300 test sentences, beam 4 (as demo.py does), 1 thread.
usage (in the scratch folder): python eval300.py RUN"""
import json
import sys

import torch

torch.set_num_threads(1)
from a2d_trainer.evaluate import evaluate_checkpoint  # noqa: E402

run = sys.argv[1]
r = evaluate_checkpoint(f"{run}/checkpoint_best.pt", "data", split="test", beam=4, device="cpu", limit=300,
                        output=f"{run}/test300_scores.json", hypotheses_out=f"{run}/test300_hyps.txt")
print(json.dumps(r))
