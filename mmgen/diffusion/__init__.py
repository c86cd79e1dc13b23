"""Diffusion: the noise schedule and loss, DDPM / DDIM samplers, and the UNet denoiser."""

from .loss import diffusion_loss, min_snr_weights
from .samplers import DDIMSampler, DDPMSampler, Sampler, dynamic_threshold, inference_timesteps, sample_loop
from .schedule import NoiseSchedule, make_betas
from .unet import UNet, UNetConfig

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "NoiseSchedule",
    "Sampler",
    "UNet",
    "UNetConfig",
    "diffusion_loss",
    "dynamic_threshold",
    "inference_timesteps",
    "make_betas",
    "min_snr_weights",
    "sample_loop",
]
