"""The training objectives of the diffusion models: loss_fn(model, batch) for the Trainer.

Each noises the model's clean samples at random timesteps, predicts, and regresses the schedule's target
(`diffusion_loss`, optionally min-SNR-gamma weighted). For classifier-free guidance, training drops conditions at
random: the model's own `drop_condition` substitutes its null inputs, the very inputs its guidance null is made of.
- DenoisingLoss: TextToImage (pixels, or a frozen VAE's latents), conditioned on captions;
- PriorLoss: DiffusionPrior, whose clean samples are the images' scaled CLIP image embeddings;
- DecoderLoss: UnCLIPDecoder, conditioned on the images' CLIP image embeddings (and captions).
A batch is {"images", "tokens"} plus the robust loader's skip counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .loss import diffusion_loss
from .samplers import standard_normal


@dataclass
class DiffusionLossConfig:
    """The denoising loss: caption dropout for classifier-free guidance, optional min-SNR-gamma weighting."""

    caption_dropout: float = 0.1  # this fraction of training captions is replaced by the empty prompt
    min_snr_gamma: float | None = None  # e.g. 5.0

    def __post_init__(self):
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1], got {self.caption_dropout}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive or null, got {self.min_snr_gamma}")


@dataclass
class DecoderLossConfig(DiffusionLossConfig):
    """The denoising loss with DALL·E 2's two dropouts for classifier-free guidance."""

    caption_dropout: float = 0.5
    image_embedding_dropout: float = 0.1  # this fraction of image embeddings is set to zero

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.image_embedding_dropout <= 1.0:
            raise ValueError(f"image_embedding_dropout must lie in [0, 1], got {self.image_embedding_dropout}")


def _dropout_mask(rows: torch.Tensor, fraction: float) -> torch.Tensor:
    """(batch,) bool, True for about `fraction` of the rows (a draw from the global RNG on the rows' device)."""
    return torch.rand(len(rows), device=rows.device) < fraction


class DenoisingLoss:
    """loss_fn of TextToImage: noise the clean samples at random timesteps, predict, diffusion_loss; in training,
    drop captions.

    `model` is the unwrapped model (the Trainer may call loss_fn with a distributed wrapper): it gives the clean
    samples (`encode_images`: the images, or VAE latents for latent diffusion) and the null caption. All draws
    (dropout masks, latents, timesteps, noise) come from torch's RNG: the Trainer seeds it afresh for each
    evaluation (in a forked RNG), so val/loss compares like with like and evaluation leaves training's RNG alone.
    """

    def __init__(self, model, config: DiffusionLossConfig):
        self.model, self.config = model, config
        self.schedule = model.schedule

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """(loss, {}): the loss_fn form (loss, metrics) every mmgen objective returns."""
        caption_mask = _dropout_mask(batch["tokens"], self.config.caption_dropout) if model.training else None
        x0 = self.clean_samples(batch["images"])
        t = torch.randint(0, self.schedule.num_train_timesteps, (len(x0),), device=x0.device)
        noise = standard_normal(x0.shape, None, x0.device, x0.dtype)
        output = model(self.schedule.add_noise(x0, noise, t), t, *self.condition_inputs(batch, caption_mask))
        target = self.schedule.target(x0, noise, t)
        return diffusion_loss(output, target, t, self.schedule, self.config.min_snr_gamma), {}

    def clean_samples(self, images: torch.Tensor) -> torch.Tensor:
        """x0, what the model denoises: the images, or their VAE latents (a posterior sample)."""
        return self.model.encode_images(images)

    def condition_inputs(self, batch: dict, caption_mask: torch.Tensor | None) -> tuple:
        """The model's inputs after (x_t, t): the captions' tokens, those of `caption_mask` (training) dropped."""
        inputs = (batch["tokens"],)
        return inputs if caption_mask is None else self.model.drop_condition(inputs, (caption_mask,))


class PriorLoss(DenoisingLoss):
    """DenoisingLoss of the DiffusionPrior: the clean samples are the scaled CLIP image embeddings of the batch's
    images (CLIP-normalised, at the CLIP's size); the condition is their captions."""

    def clean_samples(self, images: torch.Tensor) -> torch.Tensor:
        """The scaled CLIP image embeddings (batch, embed_dim) (deterministic)."""
        return self.model.image_targets(images)


class DecoderLoss(DenoisingLoss):
    """DenoisingLoss of the UnCLIPDecoder: it denoises the images given their CLIP image embeddings, zeroed
    `image_embedding_dropout` of the time in training, and (with text conditioning) their captions."""

    def clean_samples(self, images: torch.Tensor) -> torch.Tensor:
        """The images themselves."""
        return images

    def condition_inputs(self, batch: dict, caption_mask: torch.Tensor | None) -> tuple:
        """(image embeddings, tokens or None without text conditioning), dropped in training."""
        embedding = self.model.encode_image(batch["images"])  # (batch, embed_dim), unit length
        inputs = (embedding, batch["tokens"] if self.model.config.text_conditioning else None)
        if caption_mask is None:
            return inputs
        # drawn after the timesteps and noise, the caption mask before them (the draws' order is part of a run)
        embedding_mask = _dropout_mask(embedding, self.config.image_embedding_dropout)
        return self.model.drop_condition(inputs, (embedding_mask, caption_mask))
