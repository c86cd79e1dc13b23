"""CLIP's training objective: a contrastive loss (InfoNCE or SigLIP) on a batch's image and text features.

With gradient accumulation (K micro-batches per optimizer step) there are two objectives:
- "cached-features" (open_clip's --accum-freq, the default): the features of all K micro-batches are computed first
  without gradients; then each micro-batch is recomputed with gradients and scored against the cached features of the
  others. Every negative of the K-times-larger batch stays in the loss, and the summed gradients equal that batch's.
  It costs one extra forward per micro-batch; memory holds one micro-batch's activations plus K batches' features.
- "micro-batches": K independent contrastive problems of one micro-batch each, their gradients averaged (a weaker
  objective: each sample sees only its micro-batch's negatives).

With several captions per image (data.captions_per_image: all) a batch also holds "caption_mask" (batch,
max_captions) and its "tokens" are every image's captions one after the other; the loss then counts all of an
image's captions as positives (mmgen.clip.loss). Both accumulations handle it: cached features concatenate the
micro-batches' captions and masks in the same order.
"""

from __future__ import annotations

import torch

from .loss import ClipLoss, SigLipLoss

CONTRASTIVE_LOSSES = {"infonce": ClipLoss, "siglip": SigLipLoss}
ACCUMULATIONS = ("cached-features", "micro-batches")


class ContrastiveObjective:
    """loss_fn for the Trainer: `loss` ("infonce" or "siglip") of the model's features of batch["images"] and
    batch["tokens"]; also reports the learned logit scale. Under several processes the loss gathers the features of
    every process (open_clip semantics). `accumulation` says what K micro-batches of a step train (module docstring);
    with "cached-features" the Trainer hands the whole step to `step`."""

    def __init__(self, loss: str = "infonce", accumulation: str = "cached-features"):
        if loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"unknown contrastive loss {loss!r} (choose from {', '.join(CONTRASTIVE_LOSSES)})")
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"unknown accumulation {accumulation!r} (choose from {', '.join(ACCUMULATIONS)})")
        self.criterion = CONTRASTIVE_LOSSES[loss]()
        self.takes_whole_step = accumulation == "cached-features"

    def __call__(self, model, batch: dict):
        output = model(batch["images"], batch["tokens"])
        loss = self.criterion(*output, caption_mask=batch.get("caption_mask"))
        return loss, {"train/logit_scale": output.logit_scale}

    def step(self, model, micro_batches: list[dict], passes) -> tuple[torch.Tensor, dict]:
        """Forward and backward of one optimizer step whose gradients are those of the concatenated micro-batches.

        `passes` is the Trainer's mmgen.training.accumulation.GradientPasses. Each micro-batch's gradient pass
        replays the RNG state of its feature pass, so random draws in the model (patch dropout) are the same in
        both; afterwards the RNG continues from where the feature passes left it. Returns the (detached) loss."""
        states, cached = [], []
        with torch.no_grad(), passes.autocast():
            for batch in micro_batches:
                states.append(passes.rng_state())
                output = model(batch["images"], batch["tokens"])
                cached.append((output.image_features, output.text_features))
        after_features = passes.rng_state()
        masks = [batch.get("caption_mask") for batch in micro_batches]
        caption_mask = None if masks[0] is None else torch.cat(masks)  # (K * batch, max_captions)
        last = len(micro_batches) - 1
        for index, batch in enumerate(micro_batches):
            passes.set_rng_state(states[index])
            with passes.gradient_pass(last=index == last):
                output = model(batch["images"], batch["tokens"])
                images = torch.cat([f[0] for f in cached[:index]] + [output.image_features]
                                   + [f[0] for f in cached[index + 1:]])  # (K * batch, embed_dim)
                texts = torch.cat([f[1] for f in cached[:index]] + [output.text_features]
                                  + [f[1] for f in cached[index + 1:]])
                # the scale and bias enter every pass's loss: their gradient is taken in the last pass only
                scale, bias = output.logit_scale, output.logit_bias
                if index != last:
                    scale, bias = scale.detach(), bias.detach() if bias is not None else None
                loss = self.criterion(images, texts, scale, bias, caption_mask=caption_mask)
            passes.backward(loss)
        passes.set_rng_state(after_features)
        return loss.detach(), {"train/logit_scale": output.logit_scale.detach()}
