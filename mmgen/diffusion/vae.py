"""The KL autoencoder of latent diffusion (Rombach et al. 2022), weight-compatible with diffusers' AutoencoderKL.

Images (batch, in_channels, H, W) in [-1, 1] are encoded to a diagonal Gaussian over latents
(batch, latent_channels, H / f, W / f), f = 2 ** (levels - 1), and latents are decoded back to images. A latent
diffusion model works on `encode_latents` / `decode_latents`, which apply the shift and scaling factor that bring
the latents to about unit variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..hub import PretrainedMixin
from ..nn import MultiHeadAttention
from .blocks import ResidualBlock, Upsample

NORM_EPS = 1e-6  # every GroupNorm of LDM's autoencoder


@dataclass
class VAEConfig:
    """Shape of a VAE: level i has base_channels * channel_multipliers[i] channels; each level but the last halves H, W.

    mid_attention: self-attention between the two middle residual blocks of encoder and decoder.
    quant_convs: the 1x1 convolutions after the encoder and before the decoder (Stable Diffusion 1/2/XL: yes).
    Latents for diffusion are (z - shift_factor) * scaling_factor (Stable Diffusion 1/2: 0.18215, 0.0).
    """

    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    blocks_per_level: int = 2
    groups: int = 32
    mid_attention: bool = True
    quant_convs: bool = True
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self.channel_multipliers = tuple(self.channel_multipliers)
        for name in ("in_channels", "latent_channels", "base_channels", "blocks_per_level", "groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ValueError(f"channel_multipliers must be positive integers, got {self.channel_multipliers}")
        if any(width % self.groups for width in self.widths):
            raise ValueError(f"groups {self.groups} must divide every level's channels {list(self.widths)}")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each level, from the full resolution down."""
        return tuple(self.base_channels * multiplier for multiplier in self.channel_multipliers)

    @property
    def downsampling_factor(self) -> int:
        """How many image pixels one latent position spans, along height and along width."""
        return 2 ** (len(self.channel_multipliers) - 1)


class DiagonalGaussian:
    """The encoder's posterior: an independent Gaussian per latent element, from moments (batch, 2 * latent, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # each (batch, latent_channels, h, w)
        # clamped as in LDM and diffusers, so exp() neither overflows nor gives a zero variance
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; noise is drawn on the generator's device (a CPU generator works for a GPU posterior)."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)) of each sample (batch,), summed over its latent elements."""
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AsymmetricDownsample(nn.Module):
    """Halve height and width: pad one row at the bottom and one column at the right, then a stride-2 3x3 conv.

    LDM's autoencoder pads this way; the UNet's Downsample pads every side by one, which samples other pixels.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class SpatialSelfAttention(nn.Module):
    """x + single-head self-attention over the height * width positions of GroupNorm(x)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.attn = MultiHeadAttention(channels, num_heads=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (batch, height * width, channels)
        h = self.attn(h).transpose(1, 2).reshape(batch, channels, height, width)
        return x + h


def _residual(in_channels: int, out_channels: int, groups: int) -> ResidualBlock:
    return ResidualBlock(in_channels, out_channels, None, groups=groups, eps=NORM_EPS)


class MidBlock(nn.Module):
    """Residual block, self-attention (optional), residual block: the lowest resolution of encoder and decoder."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.residual_in = _residual(channels, channels, groups)
        self.attention = SpatialSelfAttention(channels, groups) if attention else None
        self.residual_out = _residual(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.residual_in(x)
        if self.attention is not None:
            x = self.attention(x)
        return self.residual_out(x)


class VAELevel(nn.Module):
    """The residual blocks of one resolution and the down- or up-sampling after them (None for the last level)."""

    def __init__(self, blocks: list[ResidualBlock], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


def _run(module: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    if checkpointed and module.training and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class VAEEncoder(nn.Module):
    """Images (batch, in_channels, H, W) -> posterior moments (batch, 2 * latent_channels, H / f, W / f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        channels = config.widths[0]
        self.conv_in = nn.Conv2d(config.in_channels, channels, 3, padding=1)
        self.levels = nn.ModuleList()
        for level, width in enumerate(config.widths):
            blocks = []
            for _ in range(config.blocks_per_level):
                blocks.append(_residual(channels, width, config.groups))
                channels = width
            is_last = level == len(config.widths) - 1
            self.levels.append(VAELevel(blocks, None if is_last else AsymmetricDownsample(channels)))
        self.mid = MidBlock(channels, config.groups, config.mid_attention)
        self.norm_out = nn.GroupNorm(config.groups, channels, eps=NORM_EPS)
        self.conv_out = nn.Conv2d(channels, 2 * config.latent_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        checkpointed = self.config.gradient_checkpointing
        h = self.conv_in(images)
        for level in self.levels:
            for block in level.blocks:
                h = _run(block, h, checkpointed)
            if level.resample is not None:
                h = level.resample(h)
        h = _run(self.mid, h, checkpointed)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAEDecoder(nn.Module):
    """Latents (batch, latent_channels, h, w) -> images (batch, in_channels, h * f, w * f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        widths = config.widths[::-1]  # from the lowest resolution up
        channels = widths[0]
        self.conv_in = nn.Conv2d(config.latent_channels, channels, 3, padding=1)
        self.mid = MidBlock(channels, config.groups, config.mid_attention)
        self.levels = nn.ModuleList()
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(config.blocks_per_level + 1):  # one more than the encoder, as in LDM
                blocks.append(_residual(channels, width, config.groups))
                channels = width
            is_last = level == len(widths) - 1
            self.levels.append(VAELevel(blocks, None if is_last else Upsample(channels)))
        self.norm_out = nn.GroupNorm(config.groups, channels, eps=NORM_EPS)
        self.conv_out = nn.Conv2d(channels, config.in_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        checkpointed = self.config.gradient_checkpointing
        h = _run(self.mid, self.conv_in(latents), checkpointed)
        for level in self.levels:
            for block in level.blocks:
                h = _run(block, h, checkpointed)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module, PretrainedMixin):
    """forward(images) -> (reconstruction, posterior) for training; encode_latents / decode_latents for diffusion."""

    model_type = "vae"
    config_class = VAEConfig

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = VAEEncoder(config)
        self.decoder = VAEDecoder(config)
        moments, latents = 2 * config.latent_channels, config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.quant_convs else None
        self.post_quant_conv = nn.Conv2d(latents, latents, 1) if config.quant_convs else None

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (batch, in_channels, H, W), H and W multiples of the downsampling factor -> the posterior."""
        config = self.config
        if images.ndim != 4 or images.shape[1] != config.in_channels:
            raise ValueError(
                f"expected images of shape (batch, {config.in_channels}, height, width), got {tuple(images.shape)}"
            )
        factor = config.downsampling_factor
        if images.shape[2] % factor or images.shape[3] % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {images.shape[2]}x{images.shape[3]}")
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (batch, latent_channels, h, w) -> images (batch, in_channels, h * f, w * f)."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"expected latents of shape (batch, {self.config.latent_channels}, height, width), "
                f"got {tuple(latents.shape)}"
            )
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def forward(
        self, images: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct `images` from a posterior sample (or its mode); returns (reconstruction, posterior)."""
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(latents), posterior

    def encode_latents(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True
    ) -> torch.Tensor:
        """Latents for diffusion: (posterior sample or mode - shift_factor) * scaling_factor."""
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return (latents - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images from diffusion latents: undoes encode_latents' scaling and shift, then decodes."""
        return self.decode(latents / self.config.scaling_factor + self.config.shift_factor)


class VAELoss(NamedTuple):
    """The training objective and its two parts, each a scalar tensor."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


def vae_loss(
    reconstruction: torch.Tensor,
    images: torch.Tensor,
    posterior: DiagonalGaussian,
    kl_weight: float = 1e-6,
    kind: Literal["l1", "mse"] = "l1",
) -> VAELoss:
    """LDM's autoencoder objective without its perceptual and adversarial terms: reconstruction + kl_weight * KL.

    Both terms are summed over each sample's elements and averaged over the batch, as in LDM, so its kl_weight
    (1e-6) carries over; the reconstruction error is |x - x_hat| (kind="l1") or (x - x_hat)^2 (kind="mse").
    """
    if kind not in ("l1", "mse"):
        raise ValueError(f"kind must be 'l1' or 'mse', got {kind!r}")
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be non-negative, got {kl_weight}")
    if reconstruction.shape != images.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and images {tuple(images.shape)} differ")
    error = reconstruction.float() - images.float()
    error = error.abs() if kind == "l1" else error.square()
    reconstruction_term = error.flatten(1).sum(dim=1).mean()
    kl_term = posterior.kl().float().mean()
    return VAELoss(reconstruction_term + kl_weight * kl_term, reconstruction_term, kl_term)
