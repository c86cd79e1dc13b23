"""pixel_shift / pixel_scale: a pixel model denoises (images - shift) * scale, and samples come back as images."""

import dataclasses

import pytest
import torch

import mmgen
from mmgen.diffusion import TextToImage, TextToImageConfig, UNetConfig
from mmgen.diffusion.objective import DenoisingLoss, DiffusionLossConfig
from mmgen.diffusion.text2img import tokenize_prompts
from mmgen.diffusion.vae import VAEConfig
from mmgen.pipelines import TextToImagePipeline
from tests.clip.helpers import make_clip
from tests.diffusion.helpers import TINY_UNET, tiny_text2img

SHIFT, SCALE = -0.6, 2.5


def scaled(model: TextToImage) -> TextToImage:
    """The same weights with pixel_shift SHIFT and pixel_scale SCALE."""
    other = TextToImage(dataclasses.replace(model.config, pixel_shift=SHIFT, pixel_scale=SCALE))
    other.load_state_dict(model.state_dict())
    return other.eval()


def test_images_are_shifted_and_scaled_and_come_back():
    model = scaled(tiny_text2img())
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(model.encode_images(images), (images - SHIFT) * SCALE)
    torch.testing.assert_close(model.decode_samples(model.encode_images(images)), images)
    # samplers clip x0 to +-sample_range: every image in [-1, 1] stays reachable, (1 + 0.6) * 2.5 = 4
    assert model.sample_range == pytest.approx(4.0) and tiny_text2img().sample_range == 1.0


def test_training_denoises_the_scaled_images():
    plain = tiny_text2img()
    model = scaled(plain)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    tokens = tokenize_prompts(["a red circle", "a blue star", "a green square", ""], model.context_length)
    config = DiffusionLossConfig(caption_dropout=0.0)
    torch.manual_seed(2)
    loss, _ = DenoisingLoss(model, config)(model, {"images": images, "tokens": tokens})
    torch.manual_seed(2)  # the plain model on images scaled by hand draws the same timesteps and noise
    expected, _ = DenoisingLoss(plain, config)(plain, {"images": (images - SHIFT) * SCALE, "tokens": tokens})
    torch.testing.assert_close(loss, expected)
    torch.manual_seed(2)
    unscaled, _ = DenoisingLoss(plain, config)(plain, {"images": images, "tokens": tokens})
    assert not torch.allclose(loss, unscaled)


def test_sampling_decodes_the_scaled_samples(tmp_path):
    plain = tiny_text2img()
    model = scaled(plain)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    options = dict(steps=4, latents=noise, progress=False, output_type="pt", guidance_scale=1.0)
    images = TextToImagePipeline(model)(["a red circle", "a blue star"], **options)
    assert images.shape == (2, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert not torch.allclose(images, TextToImagePipeline(plain)(["a red circle", "a blue star"], **options))
    model.save_pretrained(tmp_path / "t2i")  # the folder keeps them: sampling a loaded model gives the same images
    loaded = mmgen.load(tmp_path / "t2i")
    assert (loaded.config.pixel_shift, loaded.config.pixel_scale) == (SHIFT, SCALE)
    torch.testing.assert_close(TextToImagePipeline(loaded)(["a red circle", "a blue star"], **options), images)


def test_bad_values_and_a_latent_model_are_refused():
    clip_config = make_clip(0).config
    unet = UNetConfig(**TINY_UNET, context_dim=64, pooled_dim=48)
    for shift, scale in ((0.0, 0.0), (0.0, -1.0), (float("nan"), 1.0), (0.0, float("inf"))):
        with pytest.raises(ValueError, match="pixel_shift must be a finite number and pixel_scale a positive one"):
            TextToImageConfig(image_size=8, unet=unet, text_encoder=clip_config, pixel_shift=shift, pixel_scale=scale)
    latent_unet = dataclasses.replace(unet, in_channels=4, out_channels=4)
    vae = VAEConfig(latent_channels=4, base_channels=8, channel_multipliers=(1, 2), groups=4)
    with pytest.raises(ValueError, match="pixel_shift and pixel_scale are for pixel models"):
        TextToImageConfig(image_size=8, unet=latent_unet, text_encoder=clip_config, vae=vae, pixel_scale=2.0)
