"""GLIDE-style text-to-image sampling: prompts -> CLIP text encoding -> guided denoiser -> sampler -> PIL images.

For a latent diffusion model the sampler runs on VAE latents and the model's VAE decodes them at the end.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image

from ..clip.model import CLIP
from ..data.images import to_pil_images
from ..diffusion.guidance import clip_guidance, clip_score, guided_model_fn
from ..diffusion.samplers import SamplerConfig, sample_loop
from ..diffusion.text2img import TextToImage, tokenize_prompts
from ..errors import UserError
from ..hub import load_as


class TextToImagePipeline:
    """Samples images for prompts from a TextToImage model with `sampler` (default: DDIM, 50 steps, trailing spacing,
    x0 clipped to the model's sample range); CLIP guidance uses `clip` (default: its text encoder)."""

    def __init__(self, model: TextToImage, clip: CLIP | None = None, sampler: SamplerConfig | None = None):
        self.model = model
        self.clip = clip if clip is not None else model.text_encoder
        self.sampler = sampler if sampler is not None else SamplerConfig()

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, clip_model: str | Path | None = None,
                        device: str | torch.device = "cpu", adapter: str | Path | None = None) -> "TextToImagePipeline":
        """The pipeline of a text2img run or model folder (with a LoRA `adapter` folder put on it, if given), with an
        optional other CLIP folder for CLIP guidance."""
        model = load_as(checkpoint, TextToImage, map_location=device)
        if adapter is not None:
            from ..finetune import load_adapter

            load_adapter(model, adapter)
        clip = load_as(clip_model, CLIP, map_location=device) if clip_model is not None else None
        return cls(model, clip)

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | list[str],
        *,
        num_images_per_prompt: int = 1,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float = 3.0,
        guidance_interval: tuple[int, int] | None = None,
        guidance_rescale: float = 0.0,
        clip_guidance_scale: float = 0.0,
        eta: float | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> list[Image.Image]:
        """num_images_per_prompt images per prompt, prompt by prompt; the same seed gives the same images.

        An empty prompt samples unconditionally (with a warning). `sampler` (a kind of samplers.SAMPLERS), `steps` and
        `eta` (DDIM's stochasticity, 0: deterministic) override the pipeline's sampler config when given.
        guidance_interval (t_low, t_high) and guidance_rescale: see mmgen.diffusion.guidance.classifier_free_guidance.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self._check(prompts, num_images_per_prompt)
        model, config = self.model, self.model.config
        chosen = self.sampler.override(kind=sampler, steps=steps, eta=eta).build(config.schedule, model.sample_range)
        if guidance_scale < 0 or clip_guidance_scale < 0:
            raise UserError(f"guidance scales must be >= 0, got {guidance_scale} and {clip_guidance_scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise UserError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
        if guidance_interval is not None and not 0 <= guidance_interval[0] <= guidance_interval[1]:
            raise UserError(f"guidance_interval must be (t_low, t_high) with 0 <= t_low <= t_high, "
                            f"got {tuple(guidance_interval)}")
        for index, prompt in enumerate(prompts):
            if not prompt.strip():
                warnings.warn(f"prompt {index + 1} is empty: its images are sampled unconditionally", stacklevel=2)
        device = next(model.parameters()).device
        batch = [prompt for prompt in prompts for _ in range(num_images_per_prompt)]
        tokens = tokenize_prompts(batch, model.context_length).to(device)
        model_fn = guided_model_fn(model, (tokens,), guidance_scale, interval=guidance_interval,
                                   rescale=guidance_rescale)
        if clip_guidance_scale > 0:
            tokens = tokenize_prompts(batch, self.clip.config.text.context_length).to(device)
            score = clip_score(self.clip, self.clip.encode_text(tokens))
            model_fn = clip_guidance(model_fn, config.schedule, lambda x0: score(model.decode_samples(x0)),
                                     clip_guidance_scale)
        samples = sample_loop(model_fn, chosen, (len(batch), *config.sample_shape), progress=progress, device=device,
                              generator=torch.Generator().manual_seed(seed))
        return to_pil_images(model.decode_samples(samples), "minus_one_to_one")

    @staticmethod
    def _check(prompts, num_images_per_prompt):
        if not prompts:
            raise UserError("no prompt given")
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise UserError("prompts must be strings")
        if num_images_per_prompt < 1:
            raise UserError(f"the number of images per prompt must be >= 1, got {num_images_per_prompt}")
