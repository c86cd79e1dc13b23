"""Direct Preference Optimization (Rafailov et al. 2023) for the GPT: loss_fn(model, batch) for the Trainer.

DPO fits the policy pi to preference pairs (prompt x, chosen y_w, rejected y_l) without a reward model: the implicit
reward of a completion is beta * log(pi(y | x) / ref(y | x)) against a frozen reference (the base model), and the
loss is the logistic loss of the chosen completion's reward exceeding the rejected one's:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

log pi(y | x) is the sum of the completion tokens' log-probabilities (the prompt's are masked out). At the start the
policy is the reference, every reward is 0 and the loss is log 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..data.instructions import IGNORE_INDEX
from ..finetune.reference import FrozenReference


@dataclass
class DPOConfig:
    """The `dpo:` section: beta, the strength of the pull towards the reference (smaller: the policy may drift more)."""

    beta: float = 0.1

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")


def completion_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(batch,) summed log-probabilities of the targets that are not IGNORE_INDEX, in float32.

    logits: (batch, seq, vocab) predicting targets (batch, seq)."""
    kept = targets != IGNORE_INDEX
    token_log_probs = torch.gather(F.log_softmax(logits.float(), dim=-1), -1,
                                   targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (batch, seq)
    return (token_log_probs * kept).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """(mean DPO loss, metrics) from (batch,) summed log-probabilities of the chosen and rejected completions.

    metrics: dpo/reward_accuracy (share of pairs whose chosen reward is the larger), dpo/reward_margin (mean chosen
    minus rejected reward), dpo/chosen_reward and dpo/rejected_reward (means), rewards being beta * log-ratios."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    margin = margin.detach()
    return loss, {
        "dpo/reward_accuracy": (margin > 0).float().mean(),
        "dpo/reward_margin": margin.mean(),
        "dpo/chosen_reward": chosen_reward.detach().mean(),
        "dpo/rejected_reward": rejected_reward.detach().mean(),
    }


class DPOLoss:
    """loss_fn of a GPT on preference batches (mmgen.data.preferences): chosen rows first, rejected rows second.

    `model` is the unwrapped policy when this is made, before training: the reference is it with its LoRA adapters
    disabled, or (full fine-tuning) a frozen copy of it (mmgen.finetune.reference.FrozenReference)."""

    def __init__(self, model, config: DPOConfig):
        self.model, self.config = model, config
        self.reference = FrozenReference(model)

    def log_probs(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) summed completion log-probabilities under `model`, each (batch,)."""
        return completion_log_probs(model(batch["inputs"]), batch["targets"]).chunk(2)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """(loss, metrics): the DPO loss of the batch's pairs and its reward accuracy and margin."""
        with self.reference(self.model) as reference:
            reference_chosen, reference_rejected = self.log_probs(reference, batch)
        policy_chosen, policy_rejected = self.log_probs(model, batch)
        return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.config.beta)


class PreferenceEvaluation:
    """evaluate_fn for the Trainer: DPO's reward accuracy and margin on held-out pairs (val/loss is its loss).

    Reads the first `batches` batches of `batch_size` pairs of `dataset`, in order, with `objective`'s reference."""

    def __init__(self, objective: DPOLoss, dataset, collate_fn, batch_size: int, batches: int):
        self.objective, self.dataset, self.collate_fn = objective, dataset, collate_fn
        self.batch_size, self.batches = batch_size, batches

    @torch.no_grad()
    def __call__(self, model, step: int) -> dict:
        device = next(model.parameters()).device
        count = min(len(self.dataset), self.batch_size * self.batches)
        correct = margin = 0.0
        for start in range(0, count, self.batch_size):
            items = [self.dataset[index] for index in range(start, min(start + self.batch_size, count))]
            batch = {name: tensor.to(device) for name, tensor in self.collate_fn(items).items()}
            _, metrics = self.objective(model, batch)
            correct += metrics["dpo/reward_accuracy"].item() * len(items)
            margin += metrics["dpo/reward_margin"].item() * len(items)
        return {"val/reward_accuracy": correct / count, "val/reward_margin": margin / count}
