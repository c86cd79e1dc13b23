"""Diffusion: the noise schedule and loss, the training objectives, DDPM / DDIM / DPM-Solver++ samplers and their
config, guidance and the conditioning interface, the UNet, the VAE, the text-to-image model (pixels or latents) and the
unCLIP prior and decoder."""

from .decoder import DecoderCondition, DecoderConfig, UnCLIPDecoder
from .guidance import (
    ConditionalModel,
    Conditioned,
    classifier_free_guidance,
    clip_guidance,
    clip_score,
    guided_model_fn,
)
from .loss import diffusion_loss, min_snr_weights
from .objective import DecoderLoss, DecoderLossConfig, DenoisingLoss, DiffusionLossConfig, PriorLoss
from .prior import DiffusionPrior, PriorConfig, PriorTransformerConfig
from .samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    Sampler,
    SamplerConfig,
    dynamic_threshold,
    inference_timesteps,
    sample_loop,
    solver_timesteps,
)
from .schedule import NoiseSchedule, make_betas
from .text2img import PromptConditioned, TextToImage, TextToImageConfig, empty_prompt_tokens, tokenize_prompts
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

__all__ = [
    "SAMPLERS",
    "ConditionalModel",
    "Conditioned",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "DecoderCondition",
    "DecoderConfig",
    "DecoderLoss",
    "DecoderLossConfig",
    "DenoisingLoss",
    "DiffusionLossConfig",
    "DiffusionPrior",
    "NoiseSchedule",
    "PriorConfig",
    "PriorLoss",
    "PriorTransformerConfig",
    "PromptConditioned",
    "Sampler",
    "SamplerConfig",
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
    "empty_prompt_tokens",
    "guided_model_fn",
    "inference_timesteps",
    "make_betas",
    "min_snr_weights",
    "sample_loop",
    "solver_timesteps",
    "tokenize_prompts",
]
