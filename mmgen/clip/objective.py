"""CLIP's training objective: a contrastive loss (InfoNCE or SigLIP) on a batch's image and text features."""

from __future__ import annotations

from .loss import ClipLoss, SigLipLoss

CONTRASTIVE_LOSSES = {"infonce": ClipLoss, "siglip": SigLipLoss}


class ContrastiveObjective:
    """loss_fn for the Trainer: `loss` ("infonce" or "siglip") of the model's features of batch["images"] and
    batch["tokens"]; also reports the learned logit scale. Under several processes the loss gathers the features of
    every process (open_clip semantics)."""

    def __init__(self, loss: str = "infonce"):
        if loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"unknown contrastive loss {loss!r} (choose from {', '.join(CONTRASTIVE_LOSSES)})")
        self.criterion = CONTRASTIVE_LOSSES[loss]()

    def __call__(self, model, batch: dict):
        output = model(batch["images"], batch["tokens"])
        return self.criterion(*output), {"train/logit_scale": output.logit_scale}
