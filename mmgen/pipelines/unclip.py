"""unCLIP (DALL·E 2) sampling: text -> CLIP text embedding -> prior -> CLIP image embedding -> decoder -> images.

Three pipelines that only compose parts: PriorPipeline (prompts -> image embeddings), DecoderPipeline (image
embeddings, or the CLIP embeddings of given images for variations, -> images) and UnCLIPPipeline (both).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image

from ..data.images import image_transform, to_pil_images
from ..diffusion.decoder import UnCLIPDecoder
from ..diffusion.guidance import guided_model_fn
from ..diffusion.prior import DiffusionPrior
from ..diffusion.samplers import Sampler, SamplerConfig, checked_interval, sample_loop
from ..diffusion.text2img import tokenize_prompts
from ..errors import UserError
from ..hub import load_as

# no clipping for the prior: scaled embeddings are not confined to [-1, 1] like pixels
PRIOR_SAMPLER = SamplerConfig(steps=64, clip_sample=False)

DEFAULT_DECODER_GUIDANCE = 3.0  # the decoder's classifier-free guidance when none is given


def default_decoder_guidance(decoder: UnCLIPDecoder) -> float:
    """The decoder's stored guidance scale (config.json's guidance_scale), else DEFAULT_DECODER_GUIDANCE."""
    stored = decoder.config.guidance_scale
    return DEFAULT_DECODER_GUIDANCE if stored is None else stored


def _sampler_for(model: DiffusionPrior | UnCLIPDecoder, config: SamplerConfig, guidance_scale: float,
                 stage: str = "") -> Sampler:
    """The model's sampler of `config`, after one UserError line for options it cannot take (`stage` prefixes the
    option names)."""
    sampler = config.build(model.schedule, label=stage)
    if guidance_scale < 0:
        raise UserError(f"{stage}guidance scale must be >= 0, got {guidance_scale}")
    return sampler


def _prompt_list(prompts: str | list[str]) -> list[str]:
    """The prompts as a list, each a string, at least one; an empty one is sampled unconditionally (a warning)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("no prompt given")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise UserError("prompts must be strings")
    for index, prompt in enumerate(prompts):
        if not prompt.strip():
            warnings.warn(f"prompt {index + 1} is empty: its images are sampled unconditionally", stacklevel=3)
    return prompts


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class PriorPipeline:
    """Samples unit-length CLIP image embeddings for prompts from a DiffusionPrior, with classifier-free guidance and
    `sampler` (default: DDIM, 64 steps, trailing spacing, no clipping)."""

    def __init__(self, prior: DiffusionPrior, sampler: SamplerConfig | None = None):
        self.prior = prior
        self.sampler = sampler if sampler is not None else PRIOR_SAMPLER

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, device: str | torch.device = "cpu") -> "PriorPipeline":
        """The pipeline of a prior run or model folder."""
        return cls(load_as(checkpoint, DiffusionPrior, map_location=device))

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], *, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float = 2.0, eta: float | None = None, seed: int = 0,
                 progress: bool = True) -> torch.Tensor:
        """Image embeddings (len(prompts), embed_dim), one per prompt; the same seed gives the same embeddings.

        `sampler` (a kind), `steps` and `eta` override the pipeline's sampler config when given."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prior = self.prior
        chosen = _sampler_for(prior, self.sampler.override(kind=sampler, steps=steps, eta=eta), guidance_scale,
                              "prior ")
        device = _device(prior)
        tokens = tokenize_prompts(prompts, prior.context_length).to(device)
        samples = sample_loop(guided_model_fn(prior, (tokens,), guidance_scale), chosen,
                              (len(prompts), prior.embed_dim), progress=progress, device=device,
                              generator=torch.Generator().manual_seed(seed))
        return prior.to_image_embedding(samples)


class DecoderPipeline:
    """Samples images from CLIP image embeddings (and prompts, for a text-conditioned decoder) with a decoder and
    `sampler` (default: the decoder's stored one, config.default_sampler(): DDIM, 50 steps, trailing spacing, x0
    clipped to [-1, 1], unless its recipe stored another kind and steps)."""

    def __init__(self, decoder: UnCLIPDecoder, sampler: SamplerConfig | None = None):
        self.decoder = decoder
        self.sampler = sampler if sampler is not None else decoder.config.default_sampler()

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, device: str | torch.device = "cpu") -> "DecoderPipeline":
        """The pipeline of a decoder run or model folder."""
        return cls(load_as(checkpoint, UnCLIPDecoder, map_location=device))

    @torch.no_grad()
    def __call__(self, image_embeddings: torch.Tensor, prompts: list[str] | None = None, *,
                 sampler: str | None = None, steps: int | None = None, guidance_scale: float | None = None,
                 guidance_interval: tuple[int, int] | None = None, eta: float | None = None, seed: int = 0,
                 progress: bool = True) -> list[Image.Image]:
        """One image per embedding (batch, embed_dim); `prompts` (one per embedding) are used only by a decoder with
        text conditioning (default: the empty prompt). `sampler` (a kind), `steps` and `eta` override the
        pipeline's sampler config when given; `guidance_scale` None: the decoder's stored default (else 3.0);
        `guidance_interval` (t_low, t_high: guide only at those timesteps) None: the decoder's stored one (None there:
        every step)."""
        decoder, config = self.decoder, self.decoder.config
        guidance_scale = default_decoder_guidance(decoder) if guidance_scale is None else guidance_scale
        interval = checked_interval(config.guidance_interval if guidance_interval is None else guidance_interval)
        chosen = _sampler_for(decoder, self.sampler.override(kind=sampler, steps=steps, eta=eta), guidance_scale)
        if image_embeddings.ndim != 2 or image_embeddings.shape[1] != decoder.embed_dim:
            raise UserError(f"the decoder reads CLIP image embeddings of width {decoder.embed_dim}, "
                            f"got shape {tuple(image_embeddings.shape)}")
        if prompts is not None and len(prompts) != len(image_embeddings):
            raise UserError(f"{len(prompts)} prompts for {len(image_embeddings)} image embeddings")
        device = _device(decoder)
        image_embeddings = image_embeddings.to(device)
        tokens = None
        if prompts is not None and config.text_conditioning:
            tokens = tokenize_prompts(prompts, decoder.context_length).to(device)
        model_fn = guided_model_fn(decoder, (image_embeddings, tokens), guidance_scale, interval=interval)
        shape = (len(image_embeddings), config.channels, config.image_size, config.image_size)
        images = sample_loop(model_fn, chosen, shape, progress=progress, device=device,
                             generator=torch.Generator().manual_seed(seed))
        return to_pil_images(images, "minus_one_to_one")

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit-length CLIP embeddings (batch, embed_dim) of RGB PIL images, read as the decoder's CLIP reads them."""
        if not images:
            raise UserError("no image given")
        clip = self.decoder.clip
        transform = image_transform(clip.config.vision.image_size, train=False, normalize="clip")
        pixels = torch.stack([transform(image.convert("RGB")) for image in images]).to(_device(self.decoder))
        return clip.encode_image(pixels)

    def variations(self, images: list[Image.Image], *, num_variations: int = 4, **options) -> list[Image.Image]:
        """`num_variations` images per input image (image-major), decoded from its CLIP image embedding.

        `options` are __call__'s (sampler, steps, guidance_scale, eta, seed, progress)."""
        if num_variations < 1:
            raise UserError(f"the number of variations per image must be >= 1, got {num_variations}")
        embeddings = self.image_embeddings(images).repeat_interleave(num_variations, dim=0)
        return self(embeddings, **options)


class UnCLIPPipeline:
    """Text -> images through a prior and a decoder trained on the same CLIP (DALL·E 2's two stages), each with its
    sampler config (default: PriorPipeline's and DecoderPipeline's)."""

    def __init__(self, prior: DiffusionPrior, decoder: UnCLIPDecoder, prior_sampler: SamplerConfig | None = None,
                 sampler: SamplerConfig | None = None):
        if prior.embed_dim != decoder.embed_dim:
            raise UserError(f"the prior makes CLIP image embeddings of width {prior.embed_dim}, the decoder reads "
                            f"width {decoder.embed_dim}: train both on the same CLIP")
        if not _same_weights(prior.clip, decoder.clip):
            warnings.warn("the prior and the decoder were trained on different CLIPs: the images may not follow "
                          "the prompts", stacklevel=2)
        self.prior = PriorPipeline(prior, prior_sampler)
        self.decoder = DecoderPipeline(decoder, sampler)

    @classmethod
    def from_pretrained(cls, prior: str | Path, decoder: str | Path,
                        device: str | torch.device = "cpu") -> "UnCLIPPipeline":
        """The pipeline of a prior and a decoder, each a run or model folder."""
        return cls(load_as(prior, DiffusionPrior, map_location=device),
                   load_as(decoder, UnCLIPDecoder, map_location=device))

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], *, num_images_per_prompt: int = 1, sampler: str | None = None,
                 steps: int | None = None, guidance_scale: float | None = None,
                 guidance_interval: tuple[int, int] | None = None, prior_steps: int | None = None,
                 prior_guidance_scale: float = 2.0, eta: float | None = None, seed: int = 0,
                 progress: bool = True) -> list[Image.Image]:
        """num_images_per_prompt images per prompt, prompt-major; each image has its own prior sample.

        `sampler`, `steps`, `guidance_scale`, `guidance_interval` and `eta` are the decoder's, `prior_steps` the
        prior's (each overriding its sampler config); the prior samples with its config's kind (DDIM, eta 0 by
        default).
        An empty prompt samples unconditionally (with a warning)."""
        prompts = _prompt_list(prompts)
        if num_images_per_prompt < 1:
            raise UserError(f"the number of images per prompt must be >= 1, got {num_images_per_prompt}")
        decoder = self.decoder  # its options are checked before the prior samples
        _sampler_for(decoder.decoder, decoder.sampler.override(kind=sampler, steps=steps, eta=eta),
                     default_decoder_guidance(decoder.decoder) if guidance_scale is None else guidance_scale)
        checked_interval(guidance_interval)
        batch = [prompt for prompt in prompts for _ in range(num_images_per_prompt)]
        embeddings = self.prior(batch, steps=prior_steps, guidance_scale=prior_guidance_scale, seed=seed,
                                progress=progress)
        return self.decoder(embeddings, batch, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                            guidance_interval=guidance_interval, eta=eta, seed=seed, progress=progress)


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    """Whether two modules of one architecture hold equal parameters and buffers."""
    first_state, second_state = first.state_dict(), second.state_dict()
    return first_state.keys() == second_state.keys() and all(
        tensor.shape == second_state[name].shape and torch.equal(tensor, second_state[name].to(tensor.device))
        for name, tensor in first_state.items())
