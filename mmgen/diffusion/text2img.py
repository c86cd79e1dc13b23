"""GLIDE-style text-to-image diffusion (Nichol et al. 2022): a UNet conditioned on a frozen CLIP text encoder.

The CLIP's token states are the UNet's cross-attention context (with their padding mask) and its pooled, unit-length
text embedding is added to the timestep embedding. The empty prompt, used for classifier-free guidance, is CLIP's
encoding of start-of-text + end-of-text: no learned null embedding, so training (caption dropout) and sampling
use the very same unconditional input.

The whole CLIP (vision tower included, so CLIP guidance works with no other model) is part of the module: its
weights are saved in the same model.safetensors as the UNet's and its config in config.json, so a text2img
folder is self-contained and loads with `mmgen.load` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..clip.model import CLIP, CLIPConfig, TextEncoding
from ..clip.tokenizer import CLIPTokenizer
from ..hub import PretrainedMixin
from .schedule import NoiseSchedule
from .unet import UNet, UNetConfig


@dataclass
class TextToImageConfig:
    """A UNet on images of `image_size` with the UNet's in_channels, a noise schedule, and the text encoder's config.

    unet.context_dim must be the CLIP's text width and unet.pooled_dim its embed_dim (`from_text_encoder` sets both).
    """

    image_size: int = 64
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(context_dim=512, pooled_dim=512))
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    text_encoder: CLIPConfig = field(default_factory=CLIPConfig)

    def __post_init__(self):
        factor = 2 ** (len(self.unet.channel_multipliers) - 1)
        if self.image_size < 1 or self.image_size % factor:
            raise ValueError(f"image_size must be a positive multiple of {factor} (the UNet's downsampling), "
                             f"got {self.image_size}")
        if self.unet.out_channels != self.unet.in_channels:
            raise ValueError(f"unet.out_channels ({self.unet.out_channels}) must equal unet.in_channels "
                             f"({self.unet.in_channels}): the UNet predicts noise shaped like the image")
        expected = {"context_dim": self.text_encoder.text.width, "pooled_dim": self.text_encoder.embed_dim}
        for name, value in expected.items():
            if getattr(self.unet, name) != value:
                raise ValueError(f"unet.{name} is {getattr(self.unet, name)}, the text encoder needs {value}")

    @property
    def channels(self) -> int:
        """Image channels (3 for RGB)."""
        return self.unet.in_channels


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


class TextToImage(nn.Module, PretrainedMixin):
    """forward(x_t, t, tokens) -> the UNet's prediction; `encode_text` + `denoise` split it for sampling."""

    model_type = "text2img"
    config_class = TextToImageConfig

    def __init__(self, config: TextToImageConfig):
        super().__init__()
        self.config = config
        self.schedule = config.schedule
        self.unet = UNet(config.unet)
        self.text_encoder = CLIP(config.text_encoder).requires_grad_(False).eval()

    @classmethod
    def from_text_encoder(cls, clip: CLIP, image_size: int, unet: UNetConfig, schedule: NoiseSchedule) -> "TextToImage":
        """A new model (random UNet) on a copy of `clip`, with the UNet's context and pooled widths set to fit it."""
        unet = replace(unet, context_dim=clip.config.text.width, pooled_dim=clip.config.embed_dim)
        model = cls(TextToImageConfig(image_size, unet, schedule, clip.config))
        model.text_encoder.load_state_dict(clip.state_dict())
        return model

    def train(self, mode: bool = True) -> "TextToImage":
        """Set the UNet's mode; the frozen text encoder always stays in eval mode."""
        super().train(mode)
        self.text_encoder.eval()
        return self

    @property
    def context_length(self) -> int:
        """The text encoder's (and tokenizer's) context length."""
        return self.config.text_encoder.text.context_length

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> TextEncoding:
        """Token states, unit-length pooled embeddings and padding mask of CLIP tokens (batch, seq)."""
        return self.text_encoder.encode_text_tokens(tokens)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        """The UNet's prediction (epsilon, x0 or v per the schedule) for x_t at timesteps t given encoded text."""
        return self.unet(x_t, t, context=text.token_states, context_padding_mask=text.padding_mask,
                         pooled=text.embedding)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Training entry point: encode `tokens` with the frozen CLIP, then denoise."""
        return self.denoise(x_t, t, self.encode_text(tokens))
