"""Helpers for the text-to-image tests: a tiny CLIP text encoder and a tiny TextToImage with every branch live."""

import torch

from mmgen.diffusion import NoiseSchedule, TextToImage, UNetConfig
from tests.clip.helpers import make_clip

TINY_UNET = dict(base_channels=8, channel_multipliers=(1, 2), attention_levels=(False, True), blocks_per_level=1,
                 num_heads=2, groups=4)


def tiny_text2img(seed: int = 0, image_size: int = 8, prediction_type: str = "epsilon") -> TextToImage:
    """A TextToImage on a tiny perturbed CLIP whose zero-initialised UNet layers are randomised, in eval mode."""
    clip = make_clip(seed)
    torch.manual_seed(seed)
    model = TextToImage.from_text_encoder(clip, image_size, UNetConfig(**TINY_UNET),
                                          NoiseSchedule(num_train_timesteps=100, prediction_type=prediction_type))
    with torch.no_grad():
        for parameter in model.unet.parameters():
            if not parameter.any():
                parameter.normal_(std=0.2)
    return model.eval()
