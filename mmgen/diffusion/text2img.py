"""GLIDE-style text-to-image diffusion (Nichol et al. 2022): a UNet conditioned on a frozen CLIP text encoder.

The CLIP's token states are the UNet's cross-attention context (with their padding mask) and its pooled, unit-length
text embedding is added to the timestep embedding. The empty prompt, used for classifier-free guidance, is CLIP's
encoding of start-of-text + end-of-text: no learned null embedding, and `PromptConditioned.null_inputs` defines it
once, so training (caption dropout) and sampling use the very same unconditional input.

The whole CLIP (vision tower included, so CLIP guidance works with no other model) is part of the module: its
weights are saved in the same model.safetensors as the UNet's and its config in config.json, so a text2img
folder is self-contained and loads with `mmgen.load` alone.

Latent diffusion (Rombach et al. 2022) is the same model with a frozen VAE embedded beside the CLIP: the UNet
denoises the VAE's scaled latents instead of pixels. `encode_images` and `decode_samples` are the only places
where the two differ (the identity without a VAE), so the loss, the samplers and the guidance are shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..clip.frozen import FrozenCLIPMixin
from ..clip.model import CLIP, CLIPConfig, TextEncoding
from ..clip.tokenizer import CLIPTokenizer
from ..hub import PretrainedMixin
from .guidance import ConditionalModel, check_clip_sampling_values
from .samplers import SPACINGS, SamplerConfig, TimestepSpacing, check_sampling_defaults
from .schedule import NoiseSchedule
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

# the stored defaults of CLIP's part in sampling (TextToImageConfig fields, recipe samples.* keys, pipeline arguments)
CLIP_SAMPLING = ("clip_guidance_scale", "clip_guidance_views", "clip_rerank")


@dataclass
class TextToImageConfig:
    """A UNet making images of `image_size`, a noise schedule, the text encoder's config and, for latent diffusion,
    the config of the VAE whose latents the UNet denoises (None: the UNet denoises pixels).

    unet.context_dim must be the CLIP's text width and unet.pooled_dim its embed_dim or None (`from_text_encoder`
    sets both); with a VAE, unet.in_channels must be its latent_channels and image_size a multiple of its
    downsampling factor.

    How the text conditions the UNet: mask_text_padding (GLIDE's, and mmgen's default) hides the states after the
    end-of-text token from cross-attention; Stable Diffusion attends to all of them (False). text_skip_layers takes the
    text states of an earlier layer (SD's "clip skip"; SD 2's converted text encoder already ends at the penultimate).

    Sampling defaults stored with the model: guidance_scale (and guidance_interval [t_low, t_high]: guide only at those
    timesteps; None: at every step), clip_guidance_scale (CLIP guidance with the model's own CLIP, which needs its
    image tower; 0: none) and clip_guidance_views (the shifted copies of each x0 estimate it scores), clip_rerank
    (k candidates per image, the one the model's CLIP matches best to its prompt kept; 1: none), and its default
    sampler's kind and steps (sampler, sampling_steps: DDIM, 50 unless its recipe stored its evaluation grid's),
    timestep spacing and steps_offset, x0 clipping (clip_sample_range None: the model's sample_range) or dynamic
    thresholding (thresholding,
    dynamic_thresholding_ratio, sample_max_value: it wins over clipping), DDIM's set_alpha_to_one and
    use_clipped_model_output (mmgen's: "trailing", 0, clipped to sample_range, True, True; a converted Stable Diffusion
    folder's are its scheduler's, and DDIM keeps the network's epsilon as StableDiffusionPipeline does). See
    SamplerConfig.

    pixel_shift and pixel_scale (pixel models only): the UNet denoises (images - pixel_shift) * pixel_scale, as a
    latent model denoises its VAE's latents scaled by the VAE's scaling factor. The noise schedule assumes data of
    about a natural image's spread (std ~0.5 in [-1, 1]); dark, low-contrast images (a small shape on a dark
    background: std ~0.2) sit under the noise for most of it, and scaling them up gives the model more of the
    schedule to learn the content in (docs/benchmarks.md, the quickstart). The defaults (0, 1) are the images.
    """

    image_size: int = 64
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(context_dim=512, pooled_dim=512))
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    text_encoder: CLIPConfig = field(default_factory=CLIPConfig)
    vae: VAEConfig | None = None
    mask_text_padding: bool = True
    text_skip_layers: int = 0
    guidance_scale: float | None = None  # the model's default classifier-free guidance for sampling (None: 3.0)
    timestep_spacing: TimestepSpacing = "trailing"
    steps_offset: int = 0
    clip_sample: bool = True
    clip_sample_range: float | None = None
    set_alpha_to_one: bool = True
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    use_clipped_model_output: bool = True
    sampler: str = "ddim"  # the default sampler's kind and steps (a recipe stores those of its evaluation grid)
    sampling_steps: int = 50
    guidance_interval: list[int] | None = None  # guide only at timesteps t_low..t_high (None: at every step)
    clip_guidance_scale: float = 0.0  # the default CLIP guidance with the model's own CLIP (0: none)
    clip_guidance_views: int = 1  # shifted copies of each x0 estimate CLIP guidance scores (see guidance.clip_score)
    clip_rerank: int = 1  # the default candidates per image, the one the model's CLIP matches best kept (1: none)
    pixel_shift: float = 0.0  # pixel models: the UNet denoises (images - pixel_shift) * pixel_scale (see below)
    pixel_scale: float = 1.0

    def __post_init__(self):
        factor = self.unet.downsampling  # the UNet's downsampling (its patch size times 2 per level)
        if self.vae is None:
            if self.image_size < 1 or self.image_size % factor:
                raise ValueError(f"image_size must be a positive multiple of {factor} (the UNet's downsampling), "
                                 f"got {self.image_size}")
        else:
            factor *= self.vae.downsampling_factor
            if self.image_size < 1 or self.image_size % factor:
                raise ValueError(f"image_size must be a positive multiple of {factor} (the VAE's downsampling "
                                 f"times the UNet's), got {self.image_size}")
            if self.unet.in_channels != self.vae.latent_channels:
                raise ValueError(f"unet.in_channels ({self.unet.in_channels}) must equal the VAE's latent_channels "
                                 f"({self.vae.latent_channels}): the UNet denoises the VAE's latents")
        if not (math.isfinite(self.pixel_shift) and math.isfinite(self.pixel_scale) and self.pixel_scale > 0):
            raise ValueError(f"pixel_shift must be a finite number and pixel_scale a positive one, got "
                             f"{self.pixel_shift} and {self.pixel_scale}")
        if self.vae is not None and (self.pixel_shift, self.pixel_scale) != (0.0, 1.0):
            raise ValueError("pixel_shift and pixel_scale are for pixel models: a latent model's VAE scales its "
                             "latents")
        if self.unet.out_channels != self.unet.in_channels:
            raise ValueError(f"unet.out_channels ({self.unet.out_channels}) must equal unet.in_channels "
                             f"({self.unet.in_channels}): the UNet predicts noise shaped like the image")
        if self.unet.context_dim != self.text_encoder.text.width:
            raise ValueError(f"unet.context_dim is {self.unet.context_dim}, the text encoder needs "
                             f"{self.text_encoder.text.width}")
        if self.unet.pooled_dim not in (None, self.text_encoder.embed_dim):
            raise ValueError(f"unet.pooled_dim is {self.unet.pooled_dim}, the text encoder needs "
                             f"{self.text_encoder.embed_dim} (or null: no pooled text embedding)")
        check_sampling_defaults(self.guidance_scale, self.sampler, self.sampling_steps, self.guidance_interval)
        check_clip_sampling_values(self.clip_guidance_scale, self.clip_guidance_views, self.clip_rerank)
        for name, on in (("clip_guidance_scale", self.clip_guidance_scale > 0), ("clip_rerank", self.clip_rerank > 1)):
            if on and self.text_encoder.vision is None:
                raise ValueError(f"{name} needs a CLIP with an image tower; this text encoder has none")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {', '.join(SPACINGS)}, got {self.timestep_spacing!r}")
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {self.steps_offset!r}")
        if self.clip_sample_range is not None and not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be positive or null, got {self.clip_sample_range}")
        if not 0 < self.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must lie in (0, 1], got {self.dynamic_thresholding_ratio}")
        if not (math.isfinite(self.sample_max_value) and self.sample_max_value >= 1):
            raise ValueError(f"sample_max_value must be a finite number >= 1, got {self.sample_max_value}")
        if not 0 <= self.text_skip_layers < self.text_encoder.text.layers:
            raise ValueError(f"text_skip_layers must lie in [0, {self.text_encoder.text.layers}) (the text encoder's "
                             f"layers), got {self.text_skip_layers}")

    @property
    def channels(self) -> int:
        """Image channels (3 for RGB)."""
        return self.vae.in_channels if self.vae is not None else self.unet.in_channels

    @property
    def sample_size(self) -> int:
        """Height and width of what the UNet denoises: image_size, or the latents' size with a VAE."""
        return self.image_size // (self.vae.downsampling_factor if self.vae is not None else 1)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one sample the UNet denoises: an image, or a VAE latent."""
        return (self.unet.in_channels, self.sample_size, self.sample_size)

    def default_sampler(self) -> SamplerConfig:
        """The sampler this model samples with unless told otherwise: its stored kind and steps (DDIM, 50 unless its
        recipe stored others) and sampling options."""
        return SamplerConfig(kind=self.sampler, steps=self.sampling_steps, spacing=self.timestep_spacing,
                             steps_offset=self.steps_offset, clip_sample=self.clip_sample,
                             clip_sample_range=self.clip_sample_range, set_alpha_to_one=self.set_alpha_to_one,
                             thresholding=self.thresholding, dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                             sample_max_value=self.sample_max_value,
                             use_clipped_model_output=self.use_clipped_model_output)


def tokenize_prompts(prompts: list[str], context_length: int) -> torch.Tensor:
    """CLIP tokens (batch, context_length) of each prompt; an empty prompt is start-of-text + end-of-text only."""
    tokenizer = CLIPTokenizer(context_length)
    tokens = torch.zeros(len(prompts), context_length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt.strip():
            tokens[row] = tokenizer(prompt)[0]
        else:
            tokens[row, :2] = torch.tensor([tokenizer.sot_token_id, tokenizer.eot_token_id])
    return tokens


def empty_prompt_tokens(batch_size: int, context_length: int) -> torch.Tensor:
    """The empty prompt's CLIP tokens (batch_size, context_length): the null text input of every conditioned model."""
    return tokenize_prompts([""] * batch_size, context_length)


class PromptConditioned(ConditionalModel):
    """The conditioning of a model on a prompt alone (TextToImage, DiffusionPrior; with FrozenCLIPMixin): the input
    is CLIP tokens, the condition their frozen-CLIP TextEncoding, the null input the empty prompt."""

    def encode_condition(self, tokens: torch.Tensor) -> TextEncoding:
        """The frozen CLIP's encoding of tokens (batch, context_length)."""
        return self.encode_text(tokens)

    def null_inputs(self, batch_size: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor]:
        """The empty prompt's tokens (batch_size, context_length)."""
        return (empty_prompt_tokens(batch_size, self.context_length).to(device),)


LATENT_SAMPLE_RANGE = 4.0


class TextToImage(FrozenCLIPMixin, PromptConditioned, nn.Module, PretrainedMixin):
    """forward(x_t, t, tokens) -> the UNet's prediction; `encode_condition` + `denoise` split it for sampling.

    x_t lives in sample space: pixels, or a frozen VAE's latents (`encode_images` / `decode_samples` convert).
    """

    model_type = "text2img"
    config_class = TextToImageConfig
    frozen_clip_attribute = "text_encoder"

    def __init__(self, config: TextToImageConfig):
        super().__init__()
        self.config = config
        self.schedule = config.schedule
        self.unet = UNet(config.unet)
        self.text_encoder = CLIP(config.text_encoder).requires_grad_(False).eval()
        self.vae = VAE(config.vae).requires_grad_(False).eval() if config.vae is not None else None

    @classmethod
    def from_text_encoder(cls, clip: CLIP, image_size: int, unet: UNetConfig, schedule: NoiseSchedule,
                          vae: VAE | None = None, pixel_shift: float = 0.0, pixel_scale: float = 1.0) -> "TextToImage":
        """A new model (random UNet) on copies of `clip` (and of `vae`: latent diffusion), with the UNet's context and
        pooled widths set to fit the CLIP."""
        unet = replace(unet, context_dim=clip.config.text.width, pooled_dim=clip.config.embed_dim)
        vae_config = vae.config if vae is not None else None
        model = cls(TextToImageConfig(image_size, unet, schedule, clip.config, vae_config, pixel_shift=pixel_shift,
                                      pixel_scale=pixel_scale))
        model.text_encoder.load_state_dict(clip.state_dict())
        if vae is not None:
            model.vae.load_state_dict(vae.state_dict())
        return model

    def frozen_modules(self) -> list[nn.Module]:
        """The frozen text encoder, and the VAE of latent diffusion."""
        return [self.text_encoder] + ([self.vae] if self.vae is not None else [])

    @property
    def sample_range(self) -> float:
        """Where samplers clip their x0 estimates: [-1, 1] for pixels (with pixel_shift and pixel_scale: the largest
        magnitude of their image, so clipping keeps every pixel in [-1, 1] reachable); for VAE latents, scaled to unit
        variance by the measured scaling factor, +-4 standard deviations. Unclipped, the first steps from pure noise
        divide the predicted noise's errors by sqrt(alpha_bar_T) ~ 0 and the latents explode (std ~1e3 after
        DDIM-50)."""
        if self.vae is None:
            return (1.0 + abs(self.config.pixel_shift)) * self.config.pixel_scale
        return LATENT_SAMPLE_RANGE

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What the UNet learns to denoise: images (batch, C, H, W) in [-1, 1] (shifted and scaled by pixel_shift and
        pixel_scale), or with a VAE their scaled latents (a posterior sample drawn with `generator`)
        (batch, latent_channels, H / f, W / f)."""
        if self.vae is None:
            return images if self._unscaled else (images - self.config.pixel_shift) * self.config.pixel_scale
        return self.vae.encode_latents(images, generator)

    def decode_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from denoised samples: the samples (unscaled and unshifted), or the VAE's decoding of
        latents.

        Differentiable (CLIP guidance backpropagates through the VAE decoder to the latents)."""
        if self.vae is None:
            return samples if self._unscaled else samples / self.config.pixel_scale + self.config.pixel_shift
        return self.vae.decode_latents(samples)

    @property
    def _unscaled(self) -> bool:
        """A pixel model that denoises the images themselves (pixel_shift 0, pixel_scale 1)."""
        return self.config.pixel_shift == 0.0 and self.config.pixel_scale == 1.0

    @torch.no_grad()
    def encode_condition(self, tokens: torch.Tensor) -> TextEncoding:
        """The frozen CLIP's encoding of tokens (batch, context_length), from the layer text_skip_layers names."""
        return self.text_encoder.encode_text_tokens(tokens, skip_last_layers=self.config.text_skip_layers)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        """The UNet's prediction (epsilon, x0 or v per the schedule) for x_t at timesteps t given encoded text."""
        mask = text.padding_mask if self.config.mask_text_padding else None
        pooled = text.embedding if self.config.unet.pooled_dim is not None else None
        return self.unet(x_t, t, context=text.token_states, context_padding_mask=mask, pooled=pooled)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor | TextEncoding) -> torch.Tensor:
        """Training entry point: encode `tokens` with the frozen CLIP (unless given already encoded, as a latent cache
        holds them), then denoise."""
        text = tokens if isinstance(tokens, TextEncoding) else self.encode_condition(tokens)
        return self.denoise(x_t, t, text)
