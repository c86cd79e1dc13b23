"""ClipLoss and SigLipLoss against open_clip's, on one process and on two (gloo, CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss
from torch.nn import functional as F

from mmgen.clip import ClipLoss, SigLipLoss

from .distributed_loss_worker import losses_and_gradients

WORKER = Path(__file__).with_name("distributed_loss_worker.py")


def loss_and_gradients(loss_fn, bias: float | None, seed: int = 0):
    """Loss and gradients with respect to features, logit scale and bias on random unit features."""
    generator = torch.Generator().manual_seed(seed)
    image_features = F.normalize(torch.randn(8, 16, generator=generator), dim=-1).requires_grad_()
    text_features = F.normalize(torch.randn(8, 16, generator=generator), dim=-1).requires_grad_()
    logit_scale = torch.tensor(12.0, requires_grad=True)
    logit_bias = None if bias is None else torch.tensor(bias, requires_grad=True)
    loss = loss_fn(image_features, text_features, logit_scale, logit_bias)
    loss.backward()
    gradients = [image_features.grad, text_features.grad, logit_scale.grad]
    return loss.detach(), gradients + ([] if logit_bias is None else [logit_bias.grad])


@pytest.mark.parametrize(
    "ours, reference, bias",
    [
        (ClipLoss(), OpenClipLoss(), None),
        (ClipLoss(), OpenClipLoss(), 0.5),
        (SigLipLoss(), OpenSigLipLoss(), -10.0),
        (SigLipLoss(), OpenSigLipLoss(), None),
    ],
)
def test_losses_match_open_clip_on_one_process(ours, reference, bias):
    loss, gradients = loss_and_gradients(ours, bias)
    expected_loss, expected_gradients = loss_and_gradients(reference, bias)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    for gradient, expected in zip(gradients, expected_gradients, strict=True):
        assert expected.abs().max() > 0
        torch.testing.assert_close(gradient, expected, atol=1e-5, rtol=1e-5)


def test_matching_pairs_lower_the_loss():
    features = F.normalize(torch.randn(6, 8), dim=-1)
    shuffled = features[torch.randperm(6, generator=torch.Generator().manual_seed(1))]
    for loss_fn, bias in ((ClipLoss(), None), (SigLipLoss(), torch.tensor(-5.0))):
        scale = torch.tensor(20.0)
        assert loss_fn(features, features, scale, bias) < loss_fn(features, shuffled, scale, bias)


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, str(WORKER), str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    from safetensors.torch import load_file

    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(2)]
    single = losses_and_gradients(0, 1)
    for name in ("clip", "siglip"):
        # the mean over processes of the loss and of the shared parameters' gradients (what DDP averages)
        # equals one process on the concatenated batch
        for key in ("loss", "image_projection", "text_projection", "log_scale", "logit_bias"):
            if f"{name}.{key}" not in single:
                continue
            mean = (ranks[0][f"{name}.{key}"] + ranks[1][f"{name}.{key}"]) / 2
            torch.testing.assert_close(mean, single[f"{name}.{key}"], atol=1e-5, rtol=1e-5, msg=f"{name}.{key}")
        # each process's own features receive the gradient of both processes' losses: 2x the single-process rows
        for key in ("image_features", "text_features"):
            gathered = torch.cat([ranks[0][f"{name}.{key}"], ranks[1][f"{name}.{key}"]])
            torch.testing.assert_close(gathered / 2, single[f"{name}.{key}"], atol=1e-5, rtol=1e-5, msg=f"{name}.{key}")
    assert "siglip.logit_bias" in single
