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
from ..diffusion.guidance import check_clip_sampling_values, clip_guidance, clip_score, guided_model_fn
from ..diffusion.samplers import ModelFn, SamplerConfig, checked_interval, sample_loop
from ..diffusion.text2img import TextToImage, tokenize_prompts
from ..errors import UserError
from ..hub import load_as

DEFAULT_GUIDANCE_SCALE = 3.0  # for a model whose config names none (folders written before it did)


class TextToImagePipeline:
    """Samples images for prompts from a TextToImage model with `sampler` (default: its config.default_sampler(): DDIM,
    50 steps, the timestep spacing, x0 clipping and final alpha stored with the model); CLIP guidance uses `clip`
    (default: its text encoder).

    The model samples in the dtype of its weights (`from_pretrained(dtype=torch.bfloat16)`, or `model.to(...)`); the
    sampler's own arithmetic stays float32."""

    def __init__(self, model: TextToImage, clip: CLIP | None = None, sampler: SamplerConfig | None = None):
        self.model = model
        self.clip = clip if clip is not None else model.text_encoder
        self.sampler = sampler if sampler is not None else model.config.default_sampler()

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, clip_model: str | Path | None = None,
                        device: str | torch.device = "cpu", adapter: str | Path | None = None,
                        dtype: torch.dtype | None = None) -> "TextToImagePipeline":
        """The pipeline of a text2img run or model folder (with a LoRA `adapter` folder put on it, if given), with an
        optional other CLIP folder for CLIP guidance. Weights saved in float16 or bfloat16 load as well; `dtype`
        (None: float32) is the one the model samples in."""
        if dtype is not None:
            check_dtype(dtype, device)
        model = load_as(checkpoint, TextToImage, map_location=device)
        if adapter is not None:
            from ..finetune import load_adapter

            load_adapter(model, adapter)
        clip = load_as(clip_model, CLIP, map_location=device) if clip_model is not None else None
        if dtype is not None:
            model.to(dtype)
        return cls(model, clip)

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[int, int] | None = None,
        guidance_rescale: float = 0.0,
        clip_guidance_scale: float | None = None,
        clip_rerank: int | None = None,
        clip_guidance_views: int | None = None,
        eta: float | None = None,
        seed: int = 0,
        latents: torch.Tensor | None = None,
        progress: bool = True,
        output_type: str = "pil",
    ) -> list[Image.Image] | torch.Tensor:
        """num_images_per_prompt images per prompt, prompt by prompt; the same seed gives the same images.

        An empty prompt samples unconditionally (with a warning). `negative_prompt` (one for all prompts, or one per
        prompt) replaces the empty prompt in classifier-free guidance's unconditional branch. `height` and `width`
        (default: the model's image_size) must be multiples of the model's downsampling (the VAE's times the UNet's).
        `sampler` (a kind of samplers.SAMPLERS), `steps` and `eta` (DDIM's stochasticity, 0: deterministic) override
        the pipeline's sampler config when given. `latents`: the initial noise (batch, *sample shape), else drawn
        from `seed`. output_type "pt": a tensor (batch, 3, H, W) in [-1, 1] instead of PIL images.
        guidance_interval (t_low, t_high) and guidance_rescale: see mmgen.diffusion.guidance.classifier_free_guidance;
        guidance_interval None: the model's stored one (config.json's guidance_interval; None there: every step).
        `guidance_scale` None: the model's stored default (config.json's guidance_scale, chosen by its training run's
        evaluation), else 3. `clip_guidance_scale` None: the model's stored one (config.json's clip_guidance_scale, 0
        unless its recipe set one); CLIP guidance uses the pipeline's `clip`, scoring `clip_guidance_views` randomly
        shifted copies of each x0 estimate (None: the model's stored clip_guidance_views, 1 unless its recipe set
        one; see mmgen.diffusion.guidance.clip_score). `clip_rerank` k > 1: draw k candidates per image and keep the
        one the pipeline's `clip` matches best to its prompt (DALL-E's reranking; k times the sampling); None: the
        model's stored one (config.json's clip_rerank, 1 unless its recipe set one).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if output_type not in ("pil", "pt"):
            raise UserError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        self._check(prompts, num_images_per_prompt)
        negative_prompts = self._negative_prompts(negative_prompt, len(prompts))
        model, config = self.model, self.model.config
        if guidance_scale is None:  # the model's own default, chosen by its recipe's evaluation
            guidance_scale = config.guidance_scale if config.guidance_scale is not None else DEFAULT_GUIDANCE_SCALE
        if clip_guidance_scale is None:
            clip_guidance_scale = config.clip_guidance_scale
        if clip_rerank is None:
            clip_rerank = config.clip_rerank
        if clip_guidance_views is None:
            clip_guidance_views = config.clip_guidance_views
        try:
            check_clip_sampling_values(clip_rerank=clip_rerank)
        except ValueError as error:
            raise UserError(f"{error} (candidates per image)") from None
        if clip_rerank > 1 and latents is not None:
            raise UserError("latents fix each image's noise, clip_rerank draws several candidates per image: give one "
                            "or the other")
        chosen = self.sampler.override(kind=sampler, steps=steps, eta=eta).build(config.schedule, model.sample_range)
        if guidance_scale < 0 or clip_guidance_scale < 0:
            raise UserError(f"guidance scales must be >= 0, got {guidance_scale} and {clip_guidance_scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise UserError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
        if guidance_interval is None:
            guidance_interval = config.guidance_interval
        guidance_interval = checked_interval(guidance_interval)
        for index, prompt in enumerate(prompts):
            if not prompt.strip():
                warnings.warn(f"prompt {index + 1} is empty: its images are sampled unconditionally", stacklevel=2)
        parameter = next(model.unet.parameters())
        device, dtype = parameter.device, parameter.dtype
        per_prompt = num_images_per_prompt * clip_rerank  # the candidates of an image are neighbours
        batch = [prompt for prompt in prompts for _ in range(per_prompt)]
        shape = (len(batch), *self.sample_shape(height, width))
        tokens = tokenize_prompts(batch, model.context_length).to(device)
        negative_inputs = None
        if negative_prompts is not None:
            negatives = [prompt for prompt in negative_prompts for _ in range(per_prompt)]
            negative_inputs = (tokenize_prompts(negatives, model.context_length).to(device),)
        model_fn = guided_model_fn(model, (tokens,), guidance_scale, negative_inputs=negative_inputs,
                                   interval=guidance_interval, rescale=guidance_rescale)
        if dtype != torch.float32:
            model_fn = _in_dtype(model_fn, dtype)
        clip_text = None  # the CLIP's embeddings of the prompts, for CLIP guidance and reranking
        if clip_guidance_scale > 0 or clip_rerank > 1:
            clip_tokens = tokenize_prompts(batch, self.clip.config.text.context_length).to(device)
            clip_text = self.clip.encode_text(clip_tokens)
        if clip_guidance_scale > 0:
            score = clip_score(self.clip, clip_text, views=clip_guidance_views,
                               generator=torch.Generator().manual_seed(seed))
            clip_dtype = next(self.clip.parameters()).dtype
            model_fn = clip_guidance(model_fn, config.schedule,
                                     lambda x0: score(model.decode_samples(x0.to(dtype)).to(clip_dtype)),
                                     clip_guidance_scale)
        if latents is not None:
            latents = latents.to(device=device, dtype=torch.float32)
        samples = sample_loop(model_fn, chosen, shape, progress=progress, device=device, x_T=latents,
                              generator=torch.Generator().manual_seed(seed))
        images = model.decode_samples(samples.to(dtype)).float()
        if clip_rerank > 1:
            images = self._best_candidates(images, clip_text, clip_rerank)
        if output_type == "pt":  # diffusers' name: the images as a tensor (batch, 3, H, W) in [-1, 1]
            return images.clamp(-1, 1)
        return to_pil_images(images, "minus_one_to_one")

    def _best_candidates(self, images: torch.Tensor, text: torch.Tensor, candidates: int) -> torch.Tensor:
        """Of each run of `candidates` images (one image's candidates), the one whose CLIP image embedding matches
        its prompt's CLIP text embedding (`text`, one per image) best."""
        clip_dtype = next(self.clip.parameters()).dtype
        scores = clip_score(self.clip, text)(images.clamp(-1, 1).to(clip_dtype))
        best = scores.view(-1, candidates).argmax(dim=1)
        grouped = images.view(-1, candidates, *images.shape[1:])
        return grouped[torch.arange(len(best), device=images.device), best]

    def sample_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(channels, height, width) of what the UNet denoises for images of height x width (None: the model's
        image_size): the image itself, or its VAE latent, smaller by the VAE's downsampling factor."""
        config = self.model.config
        vae_factor = config.vae.downsampling_factor if config.vae is not None else 1
        multiple = vae_factor * config.unet.downsampling  # the UNet's patch size times 2 per level
        sizes = []
        for name, size in (("height", height), ("width", width)):
            size = config.image_size if size is None else size
            if size < 1 or size % multiple:
                where = "the VAE's downsampling times the UNet's" if config.vae is not None else "the UNet's downsampling"
                raise UserError(f"{name} must be a positive multiple of {multiple} ({where}), got {size}")
            sizes.append(size // vae_factor)
        return (config.unet.in_channels, *sizes)

    @staticmethod
    def _negative_prompts(negative_prompt: str | list[str] | None, num_prompts: int) -> list[str] | None:
        """One negative prompt per prompt (a single one is every prompt's), or None."""
        if negative_prompt is None:
            return None
        negatives = [negative_prompt] * num_prompts if isinstance(negative_prompt, str) else list(negative_prompt)
        if not all(isinstance(prompt, str) for prompt in negatives):
            raise UserError("negative prompts must be strings")
        if len(negatives) != num_prompts:
            raise UserError(f"give one negative prompt, or one per prompt ({num_prompts}), got {len(negatives)}")
        return negatives

    @staticmethod
    def _check(prompts, num_images_per_prompt):
        if not prompts:
            raise UserError("no prompt given")
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise UserError("prompts must be strings")
        if num_images_per_prompt < 1:
            raise UserError(f"the number of images per prompt must be >= 1, got {num_images_per_prompt}")


def _in_dtype(model_fn: ModelFn, dtype: torch.dtype) -> ModelFn:
    """model_fn run on x_t cast to `dtype` (the model's weights'), its output back in float32 for the sampler."""

    def cast(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model_fn(x_t.to(dtype), t).float()

    return cast


def check_dtype(dtype: torch.dtype, device: str | torch.device) -> None:
    """A UserError line for a sampling dtype `device` cannot compute in (bfloat16 on a GPU older than Ampere)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UserError(f"sampling dtype must be float32, float16 or bfloat16, got {dtype}")
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if dtype == torch.bfloat16 and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"{device} does not compute in bfloat16; sample in float16 or float32")
