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

from ..clip.model import TextEncoding
from ..errors import ConfigError
from .loss import diffusion_loss
from .samplers import standard_normal


@dataclass
class DiffusionLossConfig:
    """The denoising loss: caption dropout for classifier-free guidance, optional min-SNR-gamma weighting, and the
    noise options of diffusers' training scripts.

    offset_noise: the noise gets `offset_noise` times a per-(sample, channel) constant normal draw added (Guttenberg
    2023: lets a model learn very dark or bright images); it is part of the forward process, in evaluation too.
    input_perturbation: in training the network sees x_t made with noise + `input_perturbation` * a fresh normal draw,
    while the target keeps the plain noise (Ning et al. 2023, against exposure bias).
    timestep_sampling: "uniform" draws training timesteps uniformly; "logit_normal" draws t = T * sigmoid(u), u ~
    N(logit_mean, logit_std) (Esser et al. 2024, diffusers' compute_density_for_timestep_sampling): the middle noise
    levels more often than the ends (on the quickstart's shapes it did not help: docs/benchmarks.md)."""

    caption_dropout: float = 0.1  # this fraction of training captions is replaced by the empty prompt
    min_snr_gamma: float | None = None  # e.g. 5.0
    offset_noise: float = 0.0  # e.g. 0.05-0.1
    input_perturbation: float = 0.0  # e.g. 0.1
    timestep_sampling: str = "uniform"  # or "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling must be uniform or logit_normal, got {self.timestep_sampling!r}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {self.logit_std}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1], got {self.caption_dropout}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive or null, got {self.min_snr_gamma}")
        for name in ("offset_noise", "input_perturbation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


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
        caption_mask = _dropout_mask(self.rows(batch), self.config.caption_dropout) if model.training else None
        x0 = self.clean_samples_of(batch)
        t = self.timesteps(len(x0), x0.device)
        noise, input_noise = self.noise(x0, training=model.training)
        output = model(self.schedule.add_noise(x0, input_noise, t), t, *self.condition_inputs(batch, caption_mask))
        target = self.schedule.target(x0, noise, t)
        return diffusion_loss(output, target, t, self.schedule, self.config.min_snr_gamma), {}

    def timesteps(self, count: int, device: torch.device) -> torch.Tensor:
        """(count,) training timesteps in [0, T), drawn as loss.timestep_sampling says from torch's RNG."""
        steps = self.schedule.num_train_timesteps
        if self.config.timestep_sampling == "uniform":
            return torch.randint(0, steps, (count,), device=device)
        u = torch.normal(self.config.logit_mean, self.config.logit_std, (count,), device=device).sigmoid()
        return (u * steps).long().clamp(max=steps - 1)

    def noise(self, x0: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(the noise of the target, the noise x_t is made with): the same tensor unless input perturbation is on.

        Drawn in the order of diffusers' train_text_to_image.py: noise, its offset, the perturbation."""
        noise = standard_normal(x0.shape, None, x0.device, x0.dtype)
        if self.config.offset_noise:
            if x0.ndim < 3:
                raise ValueError("loss.offset_noise needs samples with channels (batch, channels, ...), "
                                 f"got shape {tuple(x0.shape)}")
            offset_shape = x0.shape[:2] + (1,) * (x0.ndim - 2)  # (batch, channels, 1, 1): one constant per channel
            noise = noise + self.config.offset_noise * standard_normal(offset_shape, None, x0.device, x0.dtype)
        if training and self.config.input_perturbation:
            return noise, noise + self.config.input_perturbation * torch.randn_like(noise)
        return noise, noise

    def rows(self, batch: dict) -> torch.Tensor:
        """A tensor with one row per sample of the batch, on its device (for the dropout masks)."""
        return batch["tokens"]

    def clean_samples_of(self, batch: dict) -> torch.Tensor:
        """x0 of the batch's samples."""
        return self.clean_samples(batch["images"])

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

    def __init__(self, model, config: DiffusionLossConfig):
        if config.offset_noise:
            raise ConfigError("loss.offset_noise applies to images and latents (a constant per channel); the prior's "
                              "samples are embeddings without channels")
        super().__init__(model, config)

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


class CachedLatentLoss(DenoisingLoss):
    """DenoisingLoss of a latent TextToImage on LatentCache batches (mmgen.diffusion.latent_cache): x0 is drawn from
    the cached posterior moments and the condition is the cached text encoding, whose dropped rows become the null
    condition's encoding (what encoding the empty prompt's tokens gives). With the same RNG it computes what
    DenoisingLoss computes from the images and captions, without running the VAE encoder or the text tower."""

    def rows(self, batch: dict) -> torch.Tensor:
        return batch["latent_mean"]

    def clean_samples_of(self, batch: dict) -> torch.Tensor:
        """A posterior sample: mean + std * noise (the draw VAE.encode_latents makes)."""
        mean = batch["latent_mean"]
        return mean + batch["latent_std"] * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)

    def condition_inputs(self, batch: dict, caption_mask: torch.Tensor | None) -> tuple:
        """(the cached TextEncoding,), rows of `caption_mask` (training) replaced by the null condition's."""
        text = TextEncoding(*(batch[name] for name in TextEncoding._fields))
        if caption_mask is None:
            return (text,)
        null = self.model.null_condition(1, caption_mask.device)
        return (TextEncoding(*(torch.where(caption_mask.view(-1, *[1] * (value.ndim - 1)), empty.to(value.dtype),
                                           value) for value, empty in zip(text, null))),)
