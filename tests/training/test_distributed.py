"""Two CPU processes under torchrun (Accelerate MULTI_CPU, gloo) train like one process on the same global batch."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mmgen.recipes import lm


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, tiny_lm_config):
    single, double = tmp_path / "single", tmp_path / "double"
    lm.train(tiny_lm_config, single, ["train.batch_size=4"])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mmgen.cli",
               "train", "lm", "--config", str(tiny_lm_config), "--out", str(double), "train.batch_size=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("model written") == 1  # only the main process reports

    a = load_file(str(single / "final" / "model.safetensors"))
    b = load_file(str(double / "final" / "model.safetensors"))
    for name in a:
        # same batches and averaged gradients; only the order of float additions differs
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=0, msg=name)
    different_batch = tmp_path / "other"
    lm.train(tiny_lm_config, different_batch, ["train.batch_size=4", "train.seed=99"])
    c = load_file(str(different_batch / "final" / "model.safetensors"))
    assert max((a[name] - c[name]).abs().max().item() for name in a) > 1e-2  # the tolerance can fail

    def val_losses(run):
        return [r["val/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val/loss" in r]

    assert val_losses(double) == pytest.approx(val_losses(single), abs=1e-4)
    assert (double / "checkpoints" / "step-10" / "rng-1.safetensors").exists()  # every process's RNG is saved
