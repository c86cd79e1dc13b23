"""CLIP (Radford et al. 2021): a ViT image tower and a causal text tower, both built from mmgen.nn blocks.

The parameter layout follows open_clip's ViT CLIP, so `open_clip_interop` converts weights both ways.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from ..hub import PretrainedMixin
from ..nn import LearnedPositions, Transformer
from ..nn.mlp import MLPKind
from .patch_dropout import drop_patches

MAX_LOGIT_SCALE = 100.0


def _check_tower(config, names: tuple[str, ...]) -> None:
    """Positive sizes and a width that splits into the heads."""
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if config.width % config.heads:
        raise ValueError(f"width {config.width} is not divisible by heads {config.heads}")


@dataclass
class CLIPVisionConfig:
    """Shape of the ViT image tower: square images of `image_size` pixels cut into `patch_size` patches."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self):
        _check_tower(self, ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio"))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class CLIPTextConfig:
    """Shape of the causal text tower; `context_length` is also the tokenizer's context length.

    pad_token_id: None feeds the tokens as given; an id replaces every token after the end-of-text token, so the
    states after it are those of the padding the weights were trained with (Stable Diffusion cross-attends to all
    77 states, unmasked: SD 1 pads with end-of-text, SD 2 with "!" = 0, mmgen's tokenizer with 0).
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    pad_token_id: int | None = None

    def __post_init__(self):
        _check_tower(self, ("context_length", "vocab_size", "width", "layers", "heads", "mlp_ratio"))
        if self.context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end of text), got {self.context_length}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be a token id below vocab_size {self.vocab_size}, "
                             f"got {self.pad_token_id}")


@dataclass
class CLIPConfig:
    """A CLIP: two towers projected to `embed_dim`; `mlp` is shared by both ("quick_gelu" for OpenAI weights).

    vision None: a text encoder alone (Stable Diffusion's), which has no encode_image.
    """

    embed_dim: int = 512
    vision: CLIPVisionConfig | None = field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    mlp: MLPKind = "gelu"
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set (SigLIP uses -10) to learn a bias added to the logits
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")
        if self.mlp not in typing.get_args(MLPKind):
            raise ValueError(f"mlp must be one of {', '.join(typing.get_args(MLPKind))}, got {self.mlp!r}")
        if not math.isfinite(self.init_logit_scale):
            raise ValueError(f"init_logit_scale must be finite, got {self.init_logit_scale}")
        if self.init_logit_bias is not None and not math.isfinite(self.init_logit_bias):
            raise ValueError(f"init_logit_bias must be finite or null, got {self.init_logit_bias}")


def clip_config(name: str) -> CLIPConfig:
    """Named sizes: "tiny" (tests, CPU) and open_clip's "ViT-B-32", "ViT-B-16", "ViT-L-14" (each also "-quickgelu")."""
    base, quick = (name[: -len("-quickgelu")], True) if name.endswith("-quickgelu") else (name, False)
    if base not in _PRESETS:
        known = ", ".join(list(_PRESETS) + [f"{n}-quickgelu" for n in _PRESETS])
        raise ValueError(f"unknown CLIP size {name!r} (known: {known})")
    embed_dim, vision, text = _PRESETS[base]
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=CLIPVisionConfig(**vision),
        text=CLIPTextConfig(**text),
        mlp="quick_gelu" if quick else "gelu",
    )


_B_TEXT = dict(context_length=77, vocab_size=49408, width=512, layers=12, heads=8)
_PRESETS = {  # name -> (embed_dim, vision, text); open_clip's ViTs use 64-wide heads
    "tiny": (
        64,
        dict(image_size=32, patch_size=8, width=64, layers=2, heads=4),
        dict(context_length=32, vocab_size=49408, width=64, layers=2, heads=4),
    ),
    "ViT-B-32": (512, dict(image_size=224, patch_size=32, width=768, layers=12, heads=12), _B_TEXT),
    "ViT-B-16": (512, dict(image_size=224, patch_size=16, width=768, layers=12, heads=12), _B_TEXT),
    "ViT-L-14": (
        768,
        dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16),
        dict(context_length=77, vocab_size=49408, width=768, layers=12, heads=12),
    ),
}


class CLIPOutput(NamedTuple):
    """What CLIP.forward returns; `loss(*output)` feeds ClipLoss or SigLipLoss. logit_bias is None without a bias."""

    image_features: torch.Tensor  # (batch, embed_dim), L2-normalised
    text_features: torch.Tensor  # (batch, embed_dim), L2-normalised
    logit_scale: torch.Tensor  # scalar: exp(logit_scale) clamped to at most 100
    logit_bias: torch.Tensor | None


class TextEncoding(NamedTuple):
    """Per-token text states (for cross-attention) and the pooled, projected text embedding."""

    token_states: torch.Tensor | None  # (batch, seq, width), after the final norm (None: not asked for)
    embedding: torch.Tensor  # (batch, embed_dim)
    padding_mask: torch.Tensor  # (batch, seq) bool, True after the end-of-text token (ignore as keys)


def _transformer(width: int, layers: int, heads: int, mlp_ratio: float, config: CLIPConfig) -> Transformer:
    return Transformer(
        layers,
        width,
        heads,
        mlp_ratio=mlp_ratio,
        mlp=config.mlp,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def _init_transformer(transformer: Transformer, width: int, layers: int) -> None:
    # open_clip's text-tower scheme (used here for both towers): std from the width, residual outputs
    # shrunk by 1/sqrt(2 * layers) so the residual stream does not grow with depth
    attn_std = width**-0.5
    proj_std = attn_std * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in transformer.blocks:
        nn.init.normal_(block.attn.qkv_proj.weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.fc_in.weight, std=fc_std)
        nn.init.normal_(block.mlp.fc_out.weight, std=proj_std)
        for name, parameter in block.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(parameter)


class VisionTower(nn.Module):
    """ViT: patches + class token + positions -> norm_pre -> transformer -> norm_post(class token) -> projection."""

    def __init__(self, config: CLIPVisionConfig, clip: CLIPConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embedding = nn.Conv2d(3, width, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.position_embedding = LearnedPositions(config.num_patches + 1, width)
        nn.init.normal_(self.position_embedding.weight, std=width**-0.5)
        self.norm_pre = nn.LayerNorm(width)
        self.transformer = _transformer(width, config.layers, config.heads, config.mlp_ratio, clip)
        _init_transformer(self.transformer, width, config.layers)
        self.norm_post = nn.LayerNorm(width)
        self.projection = nn.Linear(width, clip.embed_dim, bias=False)
        nn.init.normal_(self.projection.weight, std=width**-0.5)
        self.patch_dropout = 0.0  # fraction of patches dropped in training (FLIP); a training option, not saved

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings (batch, embed_dim) of images (batch, 3, image_size, image_size)."""
        size = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"expected images of shape (batch, 3, {size}, {size}), got {tuple(images.shape)}")
        x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))  # (batch, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (batch, patches, width)
        class_token = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([class_token, x], dim=1) + self.position_embedding(x.shape[1] + 1)
        if self.training and self.patch_dropout > 0:
            x = drop_patches(x, self.patch_dropout)
        class_position = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x = self.transformer(self.norm_pre(x), output_positions=class_position)  # the last block: class token only
        return self.projection(self.norm_post(x))


class TextTower(nn.Module):
    """Tokens + positions -> causal transformer -> final norm; pooled at the end-of-text token -> projection."""

    def __init__(self, config: CLIPTextConfig, clip: CLIPConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.position_embedding = LearnedPositions(config.context_length, width)
        nn.init.normal_(self.position_embedding.weight, std=0.01)
        self.transformer = _transformer(width, config.layers, config.heads, config.mlp_ratio, clip)
        _init_transformer(self.transformer, width, config.layers)
        self.norm_final = nn.LayerNorm(width)
        self.projection = nn.Linear(width, clip.embed_dim, bias=False)
        nn.init.normal_(self.projection.weight, std=width**-0.5)

    def forward(self, tokens: torch.Tensor, skip_last_layers: int = 0, token_states: bool = True) -> TextEncoding:
        """Token states and unnormalised pooled embedding of tokens (batch, seq <= context_length).

        skip_last_layers: states of an earlier layer, still through the final norm (Stable Diffusion's "clip skip").
        token_states=False: the pooled embedding alone (token_states is None): the last block then computes the
        end-of-text position only, which is all a contrastive loss reads.
        """
        if tokens.dim() != 2:
            raise ValueError(f"expected tokens of shape (batch, seq), got {tuple(tokens.shape)}")
        if not 0 <= skip_last_layers < self.config.layers:
            raise ValueError(f"skip_last_layers must lie in [0, {self.config.layers}), got {skip_last_layers}")
        # the end-of-text token has the largest id of CLIP's vocabulary: its position is the argmax
        end = tokens.argmax(dim=-1)
        padding_mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] > end[:, None]
        if self.config.pad_token_id is not None:
            tokens = tokens.masked_fill(padding_mask, self.config.pad_token_id)
        x = self.token_embedding(tokens) + self.position_embedding(tokens.shape[1])
        if not token_states and skip_last_layers == 0:
            pooled = self.norm_final(self.transformer(x, causal=True, output_positions=end))
            return TextEncoding(None, self.projection(pooled), padding_mask)
        x = self.transformer(x, causal=True, num_blocks=self.config.layers - skip_last_layers)
        x = self.norm_final(x)  # (batch, seq, width)
        pooled = x[torch.arange(x.shape[0], device=x.device), end]
        return TextEncoding(x, self.projection(pooled), padding_mask)


class CLIP(nn.Module, PretrainedMixin):
    """Contrastive image-text model: `encode_image`, `encode_text`, and `forward` giving a CLIPOutput."""

    model_type = "clip"
    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision, config) if config.vision is not None else None
        self.text = TextTower(config.text, config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        if config.init_logit_bias is None:
            self.logit_bias = None
        else:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings (batch, embed_dim) of normalised images (batch, 3, H, W); unit length if `normalize`."""
        if self.vision is None:
            raise UserError("this CLIP is a text encoder alone (no image tower): it cannot embed images")
        features = self.vision(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text embeddings (batch, embed_dim) of token ids (batch, seq); unit length if `normalize`."""
        embedding = self.text(tokens, token_states=False).embedding
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def encode_text_tokens(self, tokens: torch.Tensor, normalize: bool = True, skip_last_layers: int = 0
                           ) -> TextEncoding:
        """Per-token states (batch, seq, width) after the final norm, the pooled embedding and the padding mask;
        `skip_last_layers` takes the states of an earlier layer."""
        encoding = self.text(tokens, skip_last_layers)
        if normalize:
            encoding = encoding._replace(embedding=F.normalize(encoding.embedding, dim=-1))
        return encoding

    def logit_scale_exp(self) -> torch.Tensor:
        """The temperature-inverse multiplying cosine similarities: exp(logit_scale), at most 100 (0-dim)."""
        # reshape: an accelerate DeepSpeed launch holds 0-dim parameters as (1,) (mmgen.training.deepspeed_state)
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE).reshape(())

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> CLIPOutput:
        """Normalised image and text features with the logit scale (and bias) for a contrastive loss."""
        bias = None if self.logit_bias is None else self.logit_bias.reshape(())  # 0-dim, as logit_scale_exp
        return CLIPOutput(self.encode_image(images), self.encode_text(tokens), self.logit_scale_exp(), bias)
