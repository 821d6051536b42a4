"""DDP: two CPU processes under ``torchrun`` (gloo) make the same updates as one process
accumulating the same two micro-batches per update (``--update-freq 2``).

Step i of the 2-process run sees global batches 2i and 2i+1 (one per rank); the single
process sees the same two batches as its micro-batches, and the loss is normalized by the
update's token count over all ranks / micro-batches, so the gradients agree up to float
summation order. Dropout is off: the ranks draw different random masks than one process.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from test_trainer import make_toy_data, toy_pairs, train_config, write_split


def _torchrun_available():
    try:
        import torch.distributed.run  # noqa: F401
    except ImportError:
        return False
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.skipif(not _torchrun_available(), reason="torch.distributed with gloo is not available")
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    from a2d_trainer.train import train

    data = make_toy_data(tmp_path / "data")
    # A validation set of one batch: fewer batches than ranks must still validate, on all of it.
    write_split(data, "valid", toy_pairs(3, 1))
    teacher = train(train_config(data, tmp_path / "teacher", preset="micro-teacher", max_steps=2))["checkpoint"]
    common = ["--data", str(data), "--teacher", teacher, "--kd", "a2d", "--preset", "micro-student",
              "--dropout", "0", "--max-tokens", "160", "--max-steps", "3", "--warmup-updates", "2",
              "--lr", "0.002", "--seed", "5", "--log-every", "1", "--no-progress", "--a2d-backend", "reference"]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp_run = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "a2d_trainer.cli", "distill", "--run-dir", str(ddp_run), *common],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from a2d_trainer.cli import main

    assert main(["distill", "--run-dir", str(tmp_path / "single"), "--update-freq", "2", *common]) == 0

    a = torch.load(ddp_run / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "single" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == 3 and a["batch_index"] * 2 == b["batch_index"]
    assert len(a["rng"]) == 2  # one RNG state per rank, for an exact resume
    compared = 0
    for name in ("model", "objective"):
        for key, value in b[name].items():
            if key.endswith("k_proj.bias") or (name == "objective" and key.endswith(".bias")):
                # Exactly zero gradient in exact arithmetic (softmax ignores a per-row shift:
                # attention key biases, and the A2D mixer bias in "map" mode), so Adam
                # amplifies float rounding noise there into O(lr) differences.
                continue
            torch.testing.assert_close(a[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")
            compared += 1
    assert compared > 20
    def losses(run):
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["kind"] == "train"]

    ddp_losses, single_losses = losses(ddp_run), losses(tmp_path / "single")
    assert len(ddp_losses) == 3 and ddp_losses[0] != ddp_losses[-1]
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-6)

    def valid(run):  # every validation sentence counts on any number of ranks
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return [(r["tokens"], r["nll"]) for r in records if r["kind"] == "valid"]

    (ddp_tokens, ddp_nll), (single_tokens, single_nll) = valid(ddp_run)[-1], valid(tmp_path / "single")[-1]
    assert ddp_tokens == single_tokens
    assert abs(ddp_nll - single_nll) <= 1e-5 * abs(single_nll)
