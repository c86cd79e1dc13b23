"""Cached-feature contrastive accumulation: K micro-batches train exactly like one K-times-larger batch."""

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmgen.clip.objective import ContrastiveObjective

from .helpers import make_clip, random_tokens

ROOT = Path(__file__).parents[2]  # the worker runs as tests.clip.accumulation_worker from the repository root


class PlainPasses:
    """GradientPasses on one process without Accelerate: no autocast, no gradient sync."""

    def autocast(self):
        return contextlib.nullcontext()

    def gradient_pass(self, last):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def rng_state(self):
        return torch.get_rng_state(), None

    def set_rng_state(self, state):
        torch.set_rng_state(state[0])


def micro_batches(count: int, size: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"images": torch.randn(size, 3, 32, 32, generator=generator),
             "tokens": random_tokens(size, 16, generator)} for _ in range(count)]


def concatenated(batches: list[dict]) -> dict:
    return {key: torch.cat([batch[key] for batch in batches]) for key in ("images", "tokens")}


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss, bias", [("infonce", None), ("siglip", -5.0)])
def test_cached_features_equal_one_big_batch(loss, bias):
    model = make_clip(init_logit_bias=bias).train()
    reference = copy.deepcopy(model)
    batches = micro_batches(3, 4)
    objective = ContrastiveObjective(loss, "cached-features")
    assert objective.takes_whole_step
    step_loss, extras = objective.step(model, batches, PlainPasses())
    big_loss, _ = objective(reference, concatenated(batches))
    big_loss.backward()
    torch.testing.assert_close(step_loss, big_loss.detach(), atol=1e-5, rtol=1e-5)
    ours, theirs = gradients(model), gradients(reference)
    assert ours.keys() == theirs.keys() and "logit_scale" in ours and (bias is None or "logit_bias" in ours)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    # the old objective (K small problems, gradients averaged) differs: the comparison above can fail
    small = copy.deepcopy(reference)
    small.zero_grad()
    for batch in batches:
        (objective(small, batch)[0] / len(batches)).backward()
    assert max((small.get_parameter(n).grad - theirs[n]).abs().max().item() for n in theirs) > 1e-3


def test_random_draws_repeat_in_the_gradient_pass():
    """Patch dropout draws from the RNG: the gradient pass must see the masks of the feature pass."""
    model = make_clip().train()
    model.vision.patch_dropout = 0.5
    reference = copy.deepcopy(model)
    batches = micro_batches(2, 4, seed=1)
    objective = ContrastiveObjective("infonce")
    torch.manual_seed(7)
    step_loss, _ = objective.step(model, batches, PlainPasses())
    after_step = torch.rand(3)
    # reference: the same draws in the same order, one graph through every micro-batch
    torch.manual_seed(7)
    outputs = [reference(batch["images"], batch["tokens"]) for batch in batches]
    after_reference = torch.rand(3)
    images = torch.cat([o.image_features for o in outputs])
    texts = torch.cat([o.text_features for o in outputs])
    loss = objective.criterion(images, texts, outputs[0].logit_scale, None)
    loss.backward()
    torch.testing.assert_close(step_loss, loss.detach(), atol=1e-5, rtol=1e-5)
    ours, theirs = gradients(model), gradients(reference)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(after_step, after_reference)  # training's RNG continues as without replays
    # without patch dropout's draws repeated, the features (and so the loss) would differ between passes
    model.zero_grad()
    torch.manual_seed(8)
    assert not torch.allclose(objective.step(model, batches, PlainPasses())[0], step_loss)


@pytest.mark.slow
def test_two_processes_equal_one_big_batch(tmp_path):
    from safetensors.torch import load_file

    from .accumulation_worker import big_batch_gradients

    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "tests.clip.accumulation_worker", str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-3000:]
    for loss in ("infonce", "siglip"):
        expected = big_batch_gradients(loss)
        ranks = [load_file(tmp_path / f"{loss}-rank{rank}.safetensors") for rank in range(2)]
        # after DDP every process holds the averaged gradients; the mean of the two losses is the big batch's
        torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, expected["loss"], atol=1e-5, rtol=0)
        for name, value in expected.items():
            for rank in ranks if name != "loss" else ():
                torch.testing.assert_close(rank[name], value, atol=1e-5, rtol=1e-4, msg=f"{loss} {name}")


class Pairs(torch.utils.data.Dataset):
    def __init__(self, count: int):
        self.items = [{"images": b["images"][0], "tokens": b["tokens"][0]} for b in micro_batches(count, 1, seed=2)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


class Spy(ContrastiveObjective):
    """Records what the Trainer hands over."""

    def __init__(self, accumulation):
        super().__init__("infonce", accumulation)
        self.steps, self.calls, self.losses = [], 0, []

    def __call__(self, model, batch):
        self.calls += 1
        return super().__call__(model, batch)

    def step(self, model, micro_batches, passes):
        self.steps.append([len(batch["images"]) for batch in micro_batches])
        loss, extras = super().step(model, micro_batches, passes)
        self.losses.append(loss.item())
        return loss, extras


@pytest.mark.parametrize("accumulation", ["cached-features", "micro-batches"])
def test_the_trainer_hands_a_whole_step_to_the_cached_feature_objective(tmp_path, accumulation):
    import json

    from mmgen.training import TrainConfig, Trainer

    config = TrainConfig(batch_size=4, grad_accum_steps=3, max_steps=2, warmup_steps=0, eval_every=0, log_every=1,
                         checkpoint_every=0, tensorboard=False, progress=False)
    spy = Spy(accumulation)
    Trainer(make_clip().train(), config, tmp_path / "run", loss_fn=spy, train_dataset=Pairs(24)).fit()
    logged = [r["train/loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r]
    if accumulation == "cached-features":
        assert spy.steps == [[4, 4, 4]] * 2 and spy.calls == 0
        assert logged == pytest.approx(spy.losses, abs=1e-6)  # the step's loss: that of the batch of 12
    else:
        assert spy.steps == [] and spy.calls == 6
