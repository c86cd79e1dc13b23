"""The unCLIP decoder (Ramesh et al. 2022, DALL·E 2): the diffusion UNet conditioned on a CLIP image embedding.

The image embedding enters the UNet twice, as in the paper: added to the timestep embedding (the UNet's `pooled`
input) and projected into `embedding_tokens` extra context tokens that cross-attention reads, after the CLIP
text token states when `text_conditioning` is on. Classifier-free guidance: training sets the image embedding to
zero and replaces the caption by the empty prompt, each some fraction of the time; the unconditional input at
sampling is that same zero embedding and empty prompt (both defined once, by `null_inputs`).

This is not TextToImage with a switch: the condition is another object (an embedding, optionally with text), its
null is another one, and the pipelines feed it embeddings rather than prompts, so a flag would fork every method.
Both models share the one UNet, the frozen CLIP, the schedules and the samplers. The whole CLIP is kept in the
folder (its image tower makes the embeddings of training images and of the inputs of image variations).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ..clip.frozen import FrozenCLIPMixin
from ..clip.model import CLIP, CLIPConfig, TextEncoding
from ..clip.preprocess import clip_input
from ..hub import PretrainedMixin
from .guidance import ConditionalModel
from .samplers import SamplerConfig, check_sampling_defaults
from .schedule import NoiseSchedule
from .text2img import empty_prompt_tokens
from .unet import UNet, UNetConfig


@dataclass
class DecoderConfig:
    """A UNet on images of `image_size`, a noise schedule, the frozen CLIP, and how the embedding conditions the UNet.

    unet.context_dim must be the CLIP's text width and unet.pooled_dim its embed_dim (`from_clip` sets both).
    """

    image_size: int = 64
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(context_dim=512, pooled_dim=512))
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    embedding_tokens: int = 4  # extra context tokens projected from the image embedding
    text_conditioning: bool = True  # also cross-attend to the caption's CLIP token states
    # sampling defaults stored with the model (a recipe stores its evaluation grid's): the decoder's classifier-free
    # guidance (None: 3.0), the timesteps [t_low, t_high] it is applied at (None: every step; Kynkäänniemi et al.
    # 2024) and its default sampler's kind and steps (x0 clipped to [-1, 1], trailing spacing)
    guidance_scale: float | None = None
    sampler: str = "ddim"
    sampling_steps: int = 50
    guidance_interval: list[int] | None = None

    def __post_init__(self):
        factor = self.unet.downsampling
        if self.image_size < 1 or self.image_size % factor:
            raise ValueError(f"image_size must be a positive multiple of {factor} (the UNet's downsampling), "
                             f"got {self.image_size}")
        if self.unet.out_channels != self.unet.in_channels:
            raise ValueError(f"unet.out_channels ({self.unet.out_channels}) must equal unet.in_channels "
                             f"({self.unet.in_channels}): the UNet predicts noise shaped like the image")
        if self.embedding_tokens < 1:
            raise ValueError(f"embedding_tokens must be positive, got {self.embedding_tokens}")
        check_sampling_defaults(self.guidance_scale, self.sampler, self.sampling_steps, self.guidance_interval)
        expected = {"context_dim": self.clip.text.width, "pooled_dim": self.clip.embed_dim}
        for name, value in expected.items():
            if getattr(self.unet, name) != value:
                raise ValueError(f"unet.{name} is {getattr(self.unet, name)}, the CLIP needs {value}")

    @property
    def channels(self) -> int:
        """Image channels (3 for RGB)."""
        return self.unet.in_channels

    def default_sampler(self) -> SamplerConfig:
        """The sampler this decoder samples with unless told otherwise: its stored kind and steps (DDIM, 50 unless its
        recipe stored others), x0 clipped to [-1, 1]."""
        return SamplerConfig(kind=self.sampler, steps=self.sampling_steps)


class DecoderCondition(NamedTuple):
    """What the decoder denoises with: CLIP image embeddings and, with text conditioning, the encoded captions."""

    image_embedding: torch.Tensor  # (batch, embed_dim), unit length; zeros: no embedding (the guidance null)
    text: TextEncoding | None


class UnCLIPDecoder(FrozenCLIPMixin, ConditionalModel, nn.Module, PretrainedMixin):
    """forward(x_t, t, image_embedding, tokens) -> the UNet's prediction; `encode_condition` + `denoise` split it for
    sampling."""

    model_type = "decoder"
    config_class = DecoderConfig

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.schedule = config.schedule
        self.unet = UNet(config.unet)
        self.clip = CLIP(config.clip).requires_grad_(False).eval()
        self.embedding_proj = nn.Linear(config.clip.embed_dim, config.embedding_tokens * config.unet.context_dim)

    @classmethod
    def from_clip(cls, clip: CLIP, image_size: int, unet: UNetConfig, schedule: NoiseSchedule, *,
                  embedding_tokens: int = 4, text_conditioning: bool = True) -> "UnCLIPDecoder":
        """A new decoder (random UNet) on a copy of `clip`, with the UNet's context and pooled widths set to fit it."""
        unet = replace(unet, context_dim=clip.config.text.width, pooled_dim=clip.config.embed_dim)
        model = cls(DecoderConfig(image_size, unet, schedule, clip.config, embedding_tokens, text_conditioning))
        model.clip.load_state_dict(clip.state_dict())
        return model

    @property
    def embed_dim(self) -> int:
        """Width of the CLIP image embeddings the decoder reads."""
        return self.config.clip.embed_dim

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length CLIP embeddings (batch, embed_dim) of images (batch, 3, H, W) in [-1, 1], of any size."""
        return self.clip.encode_image(clip_input(images, self.config.clip.vision.image_size))

    def encode_condition(self, image_embedding: torch.Tensor, tokens: torch.Tensor | None = None) -> DecoderCondition:
        """The condition for image embeddings (batch, embed_dim) and, with text conditioning, CLIP tokens (default:
        the empty prompt)."""
        if not self.config.text_conditioning:
            if tokens is not None:
                raise ValueError("this decoder has no text conditioning; it takes no tokens")
            return DecoderCondition(image_embedding, None)
        if tokens is None:
            tokens = empty_prompt_tokens(len(image_embedding), self.context_length).to(image_embedding.device)
        return DecoderCondition(image_embedding, self.encode_text(tokens))

    def null_inputs(self, batch_size: int, device: str | torch.device = "cpu") -> tuple:
        """The guidance null for `batch_size` images: zero image embeddings (batch_size, embed_dim) and, with text
        conditioning, the empty prompt's tokens (else None)."""
        tokens = None
        if self.config.text_conditioning:
            tokens = empty_prompt_tokens(batch_size, self.context_length).to(device)
        return torch.zeros(batch_size, self.embed_dim, device=device), tokens

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition: DecoderCondition) -> torch.Tensor:
        """The UNet's prediction (epsilon, x0 or v per the schedule) for x_t at timesteps t given the condition."""
        embedding = condition.image_embedding.to(self.embedding_proj.weight.dtype)
        if embedding.ndim != 2 or embedding.shape[-1] != self.embed_dim:
            raise ValueError(f"expected image embeddings of shape (batch, {self.embed_dim}), "
                             f"got {tuple(embedding.shape)}")
        width = self.config.unet.context_dim
        context = self.embedding_proj(embedding).view(len(embedding), self.config.embedding_tokens, width)
        padding_mask = None
        if condition.text is not None:
            # the caption's token states, then the embedding's tokens (batch, text + embedding tokens, width)
            context = torch.cat([condition.text.token_states.to(context.dtype), context], dim=1)
            padding_mask = F.pad(condition.text.padding_mask, (0, self.config.embedding_tokens), value=False)
        return self.unet(x_t, t, context=context, context_padding_mask=padding_mask, pooled=embedding)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, image_embedding: torch.Tensor,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Training entry point: encode `tokens` (with text conditioning) with the frozen CLIP, then denoise."""
        return self.denoise(x_t, t, self.encode_condition(image_embedding, tokens))
