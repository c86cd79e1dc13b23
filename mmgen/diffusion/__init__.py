"""Diffusion: the noise schedule and loss, DDPM / DDIM samplers, guidance, the UNet and the text-to-image model."""

from .guidance import Conditioned, classifier_free_guidance, clip_guidance, clip_score
from .loss import diffusion_loss, min_snr_weights
from .samplers import DDIMSampler, DDPMSampler, Sampler, dynamic_threshold, inference_timesteps, sample_loop
from .schedule import NoiseSchedule, make_betas
from .text2img import TextToImage, TextToImageConfig, tokenize_prompts
from .unet import UNet, UNetConfig

__all__ = [
    "Conditioned",
    "DDIMSampler",
    "DDPMSampler",
    "NoiseSchedule",
    "Sampler",
    "TextToImage",
    "TextToImageConfig",
    "UNet",
    "UNetConfig",
    "classifier_free_guidance",
    "clip_guidance",
    "clip_score",
    "diffusion_loss",
    "dynamic_threshold",
    "inference_timesteps",
    "make_betas",
    "min_snr_weights",
    "sample_loop",
    "tokenize_prompts",
]
