"""Diffusion: the noise schedule and loss, DDPM / DDIM samplers, guidance, the UNet, the VAE, the text-to-image model
(pixels or latents) and the unCLIP prior and decoder."""

from .decoder import DecoderCondition, DecoderConfig, UnCLIPDecoder
from .guidance import Conditioned, classifier_free_guidance, clip_guidance, clip_score
from .loss import diffusion_loss, min_snr_weights
from .prior import DiffusionPrior, PriorConfig, PriorTransformerConfig
from .samplers import DDIMSampler, DDPMSampler, Sampler, dynamic_threshold, inference_timesteps, sample_loop
from .schedule import NoiseSchedule, make_betas
from .text2img import TextToImage, TextToImageConfig, tokenize_prompts
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

__all__ = [
    "Conditioned",
    "DDIMSampler",
    "DDPMSampler",
    "DecoderCondition",
    "DecoderConfig",
    "DiffusionPrior",
    "NoiseSchedule",
    "PriorConfig",
    "PriorTransformerConfig",
    "Sampler",
    "TextToImage",
    "TextToImageConfig",
    "UNet",
    "UNetConfig",
    "UnCLIPDecoder",
    "VAE",
    "VAEConfig",
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
