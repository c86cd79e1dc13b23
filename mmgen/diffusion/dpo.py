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

The DPO loss alone only asks the winner's error to fall RELATIVE to the loser's: it is also lowered by raising both,
which on the shapes model is what happens (the policy denoises everything worse and prompt fidelity drops).
`sft_weight` adds a winner-likelihood term, the diffusion form of "DPO + NLL" (RPO, Pang et al. 2024):

    loss = -log sigmoid(beta * logits) + sft_weight * (theta_w - ref_w)

averaged over pairs. Its gradient is the plain denoising loss's on the winners (ref_w is a constant; subtracting it
keeps loss = log 2 at the start). The DPO term's gradient on theta_w starts at beta / 2 per pair and shrinks as the
margin grows; on the shapes model (docs/preference-tuning.md) sft_weight = beta / 5 kept the winners' errors within
1% of the reference's while the losers' rose 15-20%, and raised held-out prompt fidelity 88.9% -> 93.1%, where
sft_weight = 0 let both rise five-fold and lost 34-41 points of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..finetune.reference import FrozenReference
from .samplers import standard_normal


@dataclass
class DiffusionDPOConfig:
    """The `dpo:` section of a diffusion fine-tuning: beta, sft_weight (the module docstring gives their scales)."""

    beta: float = 2500.0
    sft_weight: float = 0.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not self.sft_weight >= 0:
            raise ValueError(f"sft_weight must be zero or positive, got {self.sft_weight}")


def denoising_errors(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(batch,) mean squared error of each sample's prediction, in float32."""
    return (output.float() - target.float()).square().flatten(1).mean(dim=1)


def diffusion_dpo_loss(policy_errors: torch.Tensor, reference_errors: torch.Tensor, beta: float,
                       sft_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """(mean loss, metrics) from (2 * batch,) denoising errors, winners first then losers, under policy and reference.

    metrics: dpo/reward_accuracy (share of pairs with logits > 0), dpo/reward_margin (mean beta * logits), the
    policy's mean winner and loser errors and their ratios to the reference's (both rising while the margin grows is
    Diffusion-DPO's known failure), and dpo/sft (mean theta_w - ref_w) when sft_weight > 0."""
    policy_winner, policy_loser = policy_errors.chunk(2)
    reference_winner, reference_loser = reference_errors.chunk(2)
    logits = (reference_winner - reference_loser) - (policy_winner - policy_loser)
    loss = -F.logsigmoid(beta * logits).mean()
    metrics = {}
    if sft_weight > 0:
        winner_excess = (policy_winner - reference_winner).mean()
        loss = loss + sft_weight * winner_excess
        metrics["dpo/sft"] = winner_excess.detach()
    logits = logits.detach()
    return loss, {
        "dpo/reward_accuracy": (logits > 0).float().mean(),
        "dpo/reward_margin": beta * logits.mean(),
        "dpo/winner_error": policy_winner.detach().mean(),
        "dpo/loser_error": policy_loser.detach().mean(),
        "dpo/winner_error_ratio": policy_winner.detach().mean() / reference_winner.mean(),
        "dpo/loser_error_ratio": policy_loser.detach().mean() / reference_loser.mean(),
        **metrics,
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
        return diffusion_dpo_loss(policy_errors, reference_errors, self.config.beta, self.config.sft_weight)
