"""Diffusion-DPO (Wallace et al. 2023): DPO for a text-to-image model, loss_fn(model, batch) for the Trainer.

A diffusion model has no tractable log-likelihood; Diffusion-DPO replaces each log-ratio log(pi/ref) of DPO by the
difference of denoising errors at one noised version of the image, lower error standing for higher likelihood. For a
caption with a winner image x_w and a loser x_l, noised with the SAME noise at the SAME timestep t:

    logits = (ref_w - ref_l) - (theta_w - theta_l),   loss = -log sigmoid(beta * logits)

where theta_w = |target_w - model(x_w,t)|^2 (mean over the image's elements; target: the schedule's epsilon, v or
x0) and ref_* the same under the reference. logits > 0 when the policy, relative to the reference, denoises the
winner better than the loser.

Scaling convention: the paper's loss multiplies the error differences by beta * T * omega(lambda_t), with T the
number of timesteps and omega(lambda_t) a weighting held constant in practice; the published code folds all of it
into one beta over per-element MEAN squared errors, as here. The authors' code also multiplies by 0.5 (their beta =
5000 for Stable Diffusion 1.5); diffusers' port (examples/research_projects/diffusion_dpo) and this module do not,
so beta = 2500 here is the authors' 5000. At the start the policy is the reference, logits = 0 and loss = log 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..finetune.reference import FrozenReference
from .samplers import standard_normal


@dataclass
class DiffusionDPOConfig:
    """The `dpo:` section of a diffusion fine-tuning: beta (see the module docstring for its scale)."""

    beta: float = 2500.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")


def denoising_errors(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(batch,) mean squared error of each sample's prediction, in float32."""
    return (output.float() - target.float()).square().flatten(1).mean(dim=1)


def diffusion_dpo_loss(policy_errors: torch.Tensor, reference_errors: torch.Tensor,
                       beta: float) -> tuple[torch.Tensor, dict]:
    """(mean loss, metrics) from (2 * batch,) denoising errors, winners first then losers, under policy and reference.

    metrics: dpo/reward_accuracy (share of pairs with logits > 0), dpo/reward_margin (mean beta * logits), and the
    policy's mean winner and loser errors (both rising while the margin grows is Diffusion-DPO's known failure)."""
    policy_winner, policy_loser = policy_errors.chunk(2)
    reference_winner, reference_loser = reference_errors.chunk(2)
    logits = (reference_winner - reference_loser) - (policy_winner - policy_loser)
    loss = -F.logsigmoid(beta * logits).mean()
    logits = logits.detach()
    return loss, {
        "dpo/reward_accuracy": (logits > 0).float().mean(),
        "dpo/reward_margin": beta * logits.mean(),
        "dpo/winner_error": policy_winner.detach().mean(),
        "dpo/loser_error": policy_loser.detach().mean(),
    }


class DiffusionDPOLoss:
    """loss_fn of TextToImage on pair batches {"images": winners, "losers", "tokens"} (mmgen.data.shape_pairs).

    `model` is the unwrapped policy before training: the reference is it with its LoRA adapters disabled, or (full
    fine-tuning) a frozen copy. Winner and loser of a pair share the noise and the timestep; the draws (timesteps,
    then noise) come from torch's RNG, which the Trainer reseeds for each evaluation."""

    def __init__(self, model, config: DiffusionDPOConfig):
        self.model, self.config = model, config
        self.schedule = model.schedule
        self.reference = FrozenReference(model)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """(loss, metrics) of the batch's pairs."""
        pairs = len(batch["images"])
        x0 = self.model.encode_images(torch.cat([batch["images"], batch["losers"]]))  # (2 * pairs, C, H, W)
        t = torch.randint(0, self.schedule.num_train_timesteps, (pairs,), device=x0.device).repeat(2)
        noise = standard_normal(x0[:pairs].shape, None, x0.device, x0.dtype).repeat(2, *[1] * (x0.dim() - 1))
        x_t = self.schedule.add_noise(x0, noise, t)
        tokens = batch["tokens"].repeat(2, 1)
        target = self.schedule.target(x0, noise, t)
        with self.reference(self.model) as reference:
            reference_errors = denoising_errors(reference(x_t, t, tokens), target)
        policy_errors = denoising_errors(model(x_t, t, tokens), target)
        return diffusion_dpo_loss(policy_errors, reference_errors, self.config.beta)
