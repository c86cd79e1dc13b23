"""`mmgen train latent-diffusion`: the text-to-image recipe (mmgen.recipes.diffusion) on a frozen VAE's latents.

Latent diffusion (Rombach et al. 2022): images are encoded by a VAE trained first (`mmgen train vae`, or a diffusers
AutoencoderKL brought in with `mmgen convert diffusers-vae`), the UNet learns to denoise the scaled latents, and
sampling decodes them. The VAE is copied into the model beside the CLIP, so `mmgen sample text2img` and
`mmgen.load` need nothing else. Everything but `model.vae` (required here) is the diffusion recipe's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..diffusion.text2img import TextToImage
from . import diffusion


@dataclass
class LatentDiffusionModelSection(diffusion.DiffusionModelSection):
    """The diffusion model section with a VAE: unet.in_channels and out_channels must be its latent_channels,
    and image_size (of the images) a multiple of its downsampling factor times the UNet's."""

    vae: str = "runs/vae-shapes"


@dataclass
class LatentDiffusionRecipe(diffusion.DiffusionRecipe):
    """configs/ldm-*.yaml: the diffusion recipe's sections, with model.vae."""

    model: LatentDiffusionModelSection = field(default_factory=LatentDiffusionModelSection)


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False) -> TextToImage:
    """Train a latent text-to-image model as `mmgen train latent-diffusion` does; returns the (EMA) model."""
    return diffusion.train(config_path, run_dir, overrides, resume, schema=LatentDiffusionRecipe)
