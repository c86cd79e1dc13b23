"""train.fsdp under `torchrun --nproc_per_node 2` on CPU (gloo): GPT, CLIP and a UNet sharded by FSDP2 train like
one process on the same global batch, checkpoints resume exactly (either layout, on another process count), and
final/ holds the same files one process writes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.fsdp_cases import CASES, max_difference, train, train_losses, weights

WORKER = Path(__file__).with_name("fsdp_worker.py")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """OUT/<case> (2 processes, sharded), OUT/single-<case> (1 process), and the resumed runs."""
    out = tmp_path_factory.mktemp("fsdp")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    result = subprocess.run([sys.executable, str(WORKER), str(out), "--one"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for case in CASES:
        train(case, out / f"single-{case}", ema_decay=0.9 if case == "clip" else 0.0)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_sharded_training_equals_one_process_on_the_same_global_batch(runs, case):
    sharded, single = runs / case, runs / f"single-{case}"
    assert train_losses(sharded) == pytest.approx(train_losses(single), abs=TOLERANCE, rel=0)
    assert max_difference(weights(sharded / "final"), weights(single / "final")) < TOLERANCE
    # the tolerance can fail: two optimizer steps apart (at lr 1e-3, through CLIP's EMA) is far outside it
    assert max_difference(weights(sharded / "final"), weights(single / "checkpoints" / "step-2")) > 30 * TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("case", ["clip", "unet"])
def test_gathered_checkpoints_hold_the_files_one_process_writes(runs, case):
    sharded, single = runs / case / "checkpoints" / "step-2", runs / f"single-{case}" / "checkpoints" / "step-2"
    names = sorted(path.name for path in single.iterdir())
    assert sorted(path.name for path in sharded.iterdir()) == sorted(names + ["rng-1.safetensors"])
    assert (sharded / "optimizer.json").read_text() == (single / "optimizer.json").read_text()
    assert (sharded / "config.json").read_text() == (single / "config.json").read_text()
    for name in [name for name in names if name.endswith(".safetensors") and not name.startswith("rng-")]:
        assert max_difference(weights(sharded, name), weights(single, name)) < TOLERANCE, name
    final_config = (runs / case / "final" / "config.json").read_text()
    assert final_config == (single.parents[1] / "final" / "config.json").read_text()
    if case == "clip":  # the EMA of the sharded weights, and final/ holds it
        final = weights(runs / "clip" / "final")
        assert max_difference(final, weights(runs / "single-clip" / "final")) < TOLERANCE
        assert final["logit_scale"].dim() == 0  # the 0-dim parameter came back whole


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt", "unet"])  # sharded and gathered checkpoint layouts
def test_kill_and_resume_equals_the_uninterrupted_sharded_run(runs, case):
    # equal up to float rounding: a restored tensor's memory alignment can change CPU kernels' summation order
    assert max_difference(weights(runs / f"{case}-resumed" / "final"), weights(runs / case / "final")) < 1e-7
    assert train_losses(runs / f"{case}-resumed") == pytest.approx(train_losses(runs / case), abs=1e-7, rel=0)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(runs):
    step = runs / "gpt" / "checkpoints" / "step-2"
    assert json.loads((step / "shards.json").read_text())["num_shards"] == 2
    assert not (step / "model.safetensors").exists()  # nothing was gathered
    shard = weights(step, "model-shard-00001-of-00002.safetensors")
    assert "lm_head.weight" not in shard  # the tied weight is stored once
    assert shard["token_embedding.weight"].shape == (6, 16)  # rows 7..12 of 13
    assert max_difference(weights(runs / "gpt-one" / "final"), weights(runs / "gpt" / "final")) < TOLERANCE


@pytest.mark.slow
def test_a_gathered_sharded_checkpoint_resumes_without_fsdp(runs, tmp_path):
    run = tmp_path / "unet"
    shutil.copytree(runs / "unet", run, ignore=shutil.ignore_patterns("final"))
    train("unet", run, resume=True)
    assert max_difference(weights(run / "final"), weights(runs / "unet" / "final")) < TOLERANCE


@pytest.mark.slow
def test_methods_other_than_forward_work_on_the_sharded_model(runs):
    differences = json.loads((runs / "methods.json").read_text())
    assert differences["encode_image"] < TOLERANCE and differences["encode_text"] < TOLERANCE
    assert differences["generate"] == 0  # greedy: the same tokens
