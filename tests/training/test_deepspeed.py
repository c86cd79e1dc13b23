"""Accelerate's DeepSpeed on CPU: `accelerate launch --config_file configs/accelerate/deepspeed-*.yaml` (ZeRO-2, ZeRO-3,
ZeRO-3 with offload) with 2 processes (DeepSpeed's CPU accelerator over gloo) trains a GPT, a CLIP and a SigLIP CLIP
(0-dim logit_scale / logit_bias) like one process on the same global batch; its checkpoints hold the whole Adam state
in the files one process writes (0-dim parameters saved 0-dim), so a kill + --resume continues the run, and the
checkpoint resumes on one process without DeepSpeed."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.deepspeed_worker import train_siglip
from tests.training.fsdp_cases import max_difference, train, train_losses, weights

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install deepspeed; CI installs it with .[test])"),
    pytest.mark.slow,
]

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("deepspeed_worker.py")
CONFIGS = ("zero2", "zero3", "zero3-offload")  # configs/accelerate/deepspeed-<name>.yaml
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """OUT/<config>/ (2 processes, DeepSpeed: tests/training/deepspeed_worker.py) and OUT/single-<case> (1 process)."""
    out = tmp_path_factory.mktemp("deepspeed")
    train("gpt", out / "single-gpt")
    train("clip", out / "single-clip")
    train_siglip(out / "single-siglip")
    for name in CONFIGS:
        config = ROOT / "configs" / "accelerate" / f"deepspeed-{name}.yaml"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", "2", str(WORKER), str(out / name), str(out / "single-gpt")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_deepspeed_training_equals_one_process_on_the_same_global_batch(runs, config):
    run, single = runs / config / "gpt", runs / "single-gpt"
    assert train_losses(run) == pytest.approx(train_losses(single), abs=TOLERANCE, rel=0)
    assert max_difference(weights(run / "final"), weights(single / "final")) < TOLERANCE
    # the tolerance can fail: two optimizer steps apart (at lr 1e-3) is far outside it
    assert max_difference(weights(run / "final"), weights(single / "checkpoints" / "step-2")) > 30 * TOLERANCE


@pytest.mark.parametrize("config", CONFIGS)
def test_checkpoints_hold_the_files_and_adam_state_one_process_writes(runs, config):
    step = runs / config / "gpt" / "checkpoints" / "step-2"
    single = runs / "single-gpt" / "checkpoints" / "step-2"
    names = sorted(path.name for path in single.iterdir())
    assert sorted(path.name for path in step.iterdir()) == sorted(names + ["rng-1.safetensors"])
    assert (step / "optimizer.json").read_text() == (single / "optimizer.json").read_text()
    optimizer = weights(step, "optimizer.safetensors")
    assert {name.split(".", 1)[1] for name in optimizer} == {"step", "exp_avg", "exp_avg_sq"}
    assert max_difference(optimizer, weights(single, "optimizer.safetensors")) < TOLERANCE
    assert max_difference(weights(step), weights(single)) < TOLERANCE


@pytest.mark.parametrize("model", ["gpt", "clip"])
@pytest.mark.parametrize("config", CONFIGS)
def test_kill_and_resume_equals_the_uninterrupted_deepspeed_run(runs, config, model):
    run = runs / config
    # equal up to float rounding (bit-exact with torch's AdamW; DeepSpeedCPUAdam, under offload, differs by an ulp)
    assert max_difference(weights(run / f"{model}-resumed" / "final"), weights(run / model / "final")) < 1e-6
    assert train_losses(run / f"{model}-resumed") == pytest.approx(train_losses(run / model), abs=1e-6, rel=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_bf16_checkpoints_hold_the_fp32_master_weights_and_resume_exactly(runs, config):
    run = runs / config
    saved = weights(run / "gpt-bf16" / "checkpoints" / "step-2")
    # the module's own parameters are bf16 under DeepSpeed: a checkpoint of those would hold only bf16 values
    assert not all(torch.equal(value, value.bfloat16().float()) for value in saved.values())
    assert max_difference(weights(run / "gpt-bf16-resumed" / "final"), weights(run / "gpt-bf16" / "final")) < 1e-6


def test_a_resume_that_restarts_adams_moments_would_fail_the_resume_tolerance(runs, tmp_path):
    """The control of the resume test: what DeepSpeed checkpoints did before they held the optimizer state."""
    from mmgen.io import save_tensors

    run = tmp_path / "gpt"
    shutil.copytree(runs / "single-gpt", run, ignore=shutil.ignore_patterns("final"))
    optimizer_file = run / "checkpoints" / "step-2" / "optimizer.safetensors"
    state = weights(optimizer_file.parent, optimizer_file.name)
    save_tensors(optimizer_file, {name: value if name.endswith(".step") else torch.zeros_like(value)
                                  for name, value in state.items()})
    train("gpt", run, resume=True)
    assert max_difference(weights(run / "final"), weights(runs / "single-gpt" / "final")) > 30 * TOLERANCE


def test_a_deepspeed_checkpoint_resumes_on_one_process_without_deepspeed(runs, tmp_path):
    run = tmp_path / "gpt"
    shutil.copytree(runs / "zero3" / "gpt", run, ignore=shutil.ignore_patterns("final"))
    train("gpt", run, resume=True)
    assert max_difference(weights(run / "final"), weights(runs / "zero3" / "gpt" / "final")) < TOLERANCE


@pytest.mark.parametrize("config", CONFIGS)
def test_a_one_process_checkpoint_resumes_under_deepspeed(runs, config):
    resumed = weights(runs / config / "gpt-from-single" / "final")
    assert max_difference(resumed, weights(runs / "single-gpt" / "final")) < TOLERANCE


def test_final_loads_as_an_mmgen_model_folder(runs):
    import mmgen

    model, single = mmgen.load(runs / "zero3" / "gpt" / "final"), mmgen.load(runs / "single-gpt" / "final")
    tokens = torch.randint(0, 13, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - single(tokens)).abs().max().item() < 1e-4


def test_gradient_accumulation_is_refused_in_one_line(runs):
    for config in CONFIGS:
        error = json.loads((runs / config / "refused.json").read_text())["grad_accum_steps"]
        assert "\n" not in error and "train.grad_accum_steps" in error


# ---------------------------------------------------------------- CLIP: 0-dim parameters, held as (1,) by the engine
CLIP_CASES = ("clip", "siglip")  # siglip: a learned logit_bias next to logit_scale
SCALARS = {"clip": ("logit_scale",), "siglip": ("logit_scale", "logit_bias")}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("case", CLIP_CASES)
def test_clip_trains_under_deepspeed_like_one_process(runs, config, case):
    run, single = runs / config / case, runs / f"single-{case}"
    assert train_losses(run) == pytest.approx(train_losses(single), abs=TOLERANCE, rel=0)
    trained, expected = weights(run / "final"), weights(single / "final")
    assert max_difference(trained, expected) < TOLERANCE
    initial = weights(single / "checkpoints" / "step-2")
    for name in SCALARS[case]:
        assert trained[name].shape == () and (trained[name] - expected[name]).abs().item() < TOLERANCE
        # the scalars were trained, and the tolerance can fail: two optimizer steps move them far outside it
        assert (trained[name] - initial[name]).abs().item() > 30 * TOLERANCE


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("case", CLIP_CASES)
def test_clip_checkpoints_hold_0_dim_scalars_and_the_adam_state_one_process_writes(runs, config, case):
    step = runs / config / case / "checkpoints" / "step-2"
    single = runs / f"single-{case}" / "checkpoints" / "step-2"
    assert sorted(path.name for path in step.iterdir()) == sorted([path.name for path in single.iterdir()]
                                                                  + ["rng-1.safetensors"])
    assert (step / "optimizer.json").read_text() == (single / "optimizer.json").read_text()
    for name in ("model.safetensors", "optimizer.safetensors"):
        saved, expected = weights(step, name), weights(single, name)
        assert {key: value.shape for key, value in saved.items()} == {key: value.shape for key, value in
                                                                      expected.items()}
        assert max_difference(saved, expected) < TOLERANCE
    assert all(weights(step)[name].shape == () for name in SCALARS[case])


@pytest.mark.parametrize("config", CONFIGS)
def test_clip_final_loads_with_mmgen_load_like_one_process(runs, config):
    import mmgen

    model, single = mmgen.load(runs / config / "siglip" / "final"), mmgen.load(runs / "single-siglip" / "final")
    assert model.logit_scale.dim() == 0 and model.logit_bias.dim() == 0
    generator = torch.Generator().manual_seed(0)
    images, tokens = torch.randn(2, 3, 8, 8, generator=generator), torch.randint(1, 20, (2, 6), generator=generator)
    with torch.no_grad():
        output, expected = model(images, tokens), single(images, tokens)
    assert output.logit_scale.shape == () and output.logit_bias.shape == ()
    for value, reference in zip(output, expected):
        assert (value - reference).abs().max().item() < 1e-4


def test_a_deepspeed_clip_checkpoint_resumes_on_one_process_without_deepspeed(runs, tmp_path):
    run = tmp_path / "clip"
    shutil.copytree(runs / "zero3" / "clip", run, ignore=shutil.ignore_patterns("final"))
    train("clip", run, resume=True)
    assert max_difference(weights(run / "final"), weights(runs / "zero3" / "clip" / "final")) < TOLERANCE
