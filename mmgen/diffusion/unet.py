"""The denoising UNet (Ho et al. 2020; Dhariwal & Nichol 2021): residual levels, skips, and attention from mmgen.nn.

Conditioning: the timestep (always), a pooled vector added to the timestep embedding (`pooled_dim`, e.g. a
CLIP text or image embedding), and a token sequence attended to by cross-attention (`context_dim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..hub import PretrainedMixin
from ..nn import TimestepEmbedding
from ..nn.mlp import MLPKind
from .blocks import Downsample, ResidualBlock, SpatialTransformer, Upsample


@dataclass
class UNetConfig:
    """Shape of a UNet: level i has base_channels * channel_multipliers[i] channels, attention if attention_levels[i].

    context_dim: width of the token states cross-attended to (None: no cross-attention); pooled_dim: width of a
    pooled vector added to the timestep embedding (None: none).

    The spatial transformers' options (their defaults are mmgen's own UNet; Stable Diffusion's in brackets):
    heads_per_level overrides num_heads per level (SD's attention_head_dim, which counts heads), head_dim sets
    channels / head_dim heads instead (one of the two at most; the middle block takes the last level's);
    transformer_depth: blocks per spatial transformer, per level (the middle block takes the last level's);
    mlp ("geglu"), attention_qkv_bias (False), upcast_attention (SD 2.1: True), attention_norm_eps (1e-6, as here).
    norm_eps: the GroupNorm eps of the residual blocks and the output norm (1e-5, as here).

    patch_size p > 1 folds each p x p patch of the input into channels before the first convolution (pixel unshuffle)
    and unfolds the output the same way (Hoogeboom et al. 2023, "simple diffusion"): every level runs at 1/p of the
    input's height and width, as a latent UNet on a VAE of factor p would, with no VAE to train.
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 2
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_heads: int = 4
    context_dim: int | None = None
    pooled_dim: int | None = None
    dropout: float = 0.0
    groups: int = 32
    scale_shift_norm: bool = True
    gradient_checkpointing: bool = False
    heads_per_level: tuple[int, ...] | None = None
    head_dim: int | None = None
    transformer_depth: tuple[int, ...] | None = None
    mlp: MLPKind = "gelu"
    attention_qkv_bias: bool = True
    upcast_attention: bool = False
    norm_eps: float = 1e-5
    attention_norm_eps: float = 1e-6
    patch_size: int = 1

    def __post_init__(self):
        self.channel_multipliers = tuple(self.channel_multipliers)
        self.attention_levels = tuple(self.attention_levels)
        levels = len(self.channel_multipliers)
        for name in ("heads_per_level", "transformer_depth"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))
                if len(value) != levels or min(value) < 1:
                    raise ValueError(f"{name} must hold one positive integer per level ({levels}), got {value}")
        if self.heads_per_level is not None and self.head_dim is not None:
            raise ValueError("give heads_per_level or head_dim, not both")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim must be positive or None, got {self.head_dim}")
        for name in ("norm_eps", "attention_norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("in_channels", "out_channels", "base_channels", "blocks_per_level", "num_heads", "groups",
                     "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("context_dim", "pooled_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ValueError(f"channel_multipliers must be positive integers, got {self.channel_multipliers}")
        if len(self.attention_levels) != len(self.channel_multipliers):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries, "
                f"channel_multipliers {len(self.channel_multipliers)}: give one per level"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        widths = [self.base_channels * multiplier for multiplier in (1, *self.channel_multipliers)]
        if any(width % self.groups for width in widths):
            raise ValueError(f"groups {self.groups} must divide every level's channels {widths}")
        # the middle block always attends, at the deepest level's width
        attended = [(w, level) for level, (w, attends) in enumerate(zip(widths[1:], self.attention_levels)) if attends]
        for width, level in attended + [(widths[-1], levels - 1)]:
            heads = self.heads_at(level)
            if heads < 1 or width % heads or (self.head_dim is not None and width % self.head_dim):
                if self.head_dim is not None:
                    raise ValueError(f"head_dim {self.head_dim} must divide the {width} channels of level {level}")
                if self.heads_per_level is not None:
                    raise ValueError(f"heads_per_level[{level}] = {heads} must divide its {width} channels")
                channels = [width for width, _ in attended] + [widths[-1]]
                raise ValueError(f"num_heads {heads} must divide the channels of every attention level {channels}")

    def heads_at(self, level: int) -> int:
        """The number of attention heads of the spatial transformers at `level` (the middle block: the last)."""
        if self.head_dim is not None:
            return self.base_channels * self.channel_multipliers[level] // self.head_dim
        return self.heads_per_level[level] if self.heads_per_level is not None else self.num_heads

    def depth_at(self, level: int) -> int:
        """The number of transformer blocks of the spatial transformers at `level` (the middle block: the last)."""
        return self.transformer_depth[level] if self.transformer_depth is not None else 1

    @property
    def downsampling(self) -> int:
        """What the input's height and width must be multiples of: the patch size times 2 per level after the
        first."""
        return self.patch_size * 2 ** (len(self.channel_multipliers) - 1)

    @property
    def embedding_dim(self) -> int:
        """Width of the timestep (+ pooled) conditioning vector."""
        return 4 * self.base_channels


class UNetStage(nn.Module):
    """A residual block, followed by a spatial transformer at attention levels."""

    def __init__(self, residual: ResidualBlock, attention: SpatialTransformer | None):
        super().__init__()
        self.residual = residual
        self.attention = attention

    def forward(self, x, embedding, context=None, context_padding_mask=None) -> torch.Tensor:
        x = self.residual(x, embedding)
        if self.attention is not None:
            x = self.attention(x, context, context_padding_mask)
        return x


class UNetLevel(nn.Module):
    """The stages of one resolution level and the down- or up-sampling that follows them (None at the ends)."""

    def __init__(self, stages: list[UNetStage], resample: nn.Module | None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.resample = resample


class UNet(nn.Module, PretrainedMixin):
    """forward(x, t, context, context_padding_mask, pooled) -> the prediction (epsilon, x0 or v), shaped like x."""

    model_type = "unet"
    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        embedding_dim = config.embedding_dim
        self.time_embedding = TimestepEmbedding(config.base_channels, embedding_dim)
        self.pooled_proj = nn.Linear(config.pooled_dim, embedding_dim) if config.pooled_dim is not None else None
        patch_area = config.patch_size ** 2
        self.conv_in = nn.Conv2d(config.in_channels * patch_area, config.base_channels, 3, padding=1)

        widths = [config.base_channels * multiplier for multiplier in config.channel_multipliers]
        channels = config.base_channels
        skip_channels = [channels]  # the width of every tensor the down path hands to the up path
        self.down_levels = nn.ModuleList()
        for level, width in enumerate(widths):
            stages = []
            for _ in range(config.blocks_per_level):
                stages.append(self._stage(channels, width, config.attention_levels[level], level))
                channels = width
                skip_channels.append(channels)
            is_last = level == len(widths) - 1
            if not is_last:
                skip_channels.append(channels)
            self.down_levels.append(UNetLevel(stages, None if is_last else Downsample(channels)))

        self.mid_stage = self._stage(channels, channels, attention=True, level=len(widths) - 1)
        self.mid_residual = self._residual(channels, channels)

        self.up_levels = nn.ModuleList()
        for level in reversed(range(len(widths))):
            stages = []
            for _ in range(config.blocks_per_level + 1):
                in_channels = channels + skip_channels.pop()  # the skip is concatenated to the input
                stages.append(self._stage(in_channels, widths[level], config.attention_levels[level], level))
                channels = widths[level]
            self.up_levels.append(UNetLevel(stages, Upsample(channels) if level > 0 else None))

        self.norm_out = nn.GroupNorm(config.groups, channels, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels, config.out_channels * patch_area, 3, padding=1)
        # a fresh model predicts zero: the common start for diffusion training
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _residual(self, in_channels: int, out_channels: int) -> ResidualBlock:
        config = self.config
        return ResidualBlock(
            in_channels,
            out_channels,
            config.embedding_dim,
            groups=config.groups,
            dropout=config.dropout,
            scale_shift_norm=config.scale_shift_norm,
            eps=config.norm_eps,
        )

    def _stage(self, in_channels: int, out_channels: int, attention: bool, level: int) -> UNetStage:
        config = self.config
        transformer = None
        if attention:
            transformer = SpatialTransformer(
                out_channels,
                config.heads_at(level),
                context_dim=config.context_dim,
                groups=config.groups,
                dropout=config.dropout,
                depth=config.depth_at(level),
                mlp=config.mlp,
                qkv_bias=config.attention_qkv_bias,
                upcast_attention=config.upcast_attention,
                norm_eps=config.attention_norm_eps,
            )
        return UNetStage(self._residual(in_channels, out_channels), transformer)

    def _run(self, module: nn.Module, *inputs) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *inputs, use_reentrant=False)
        return module(*inputs)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_padding_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (batch, in_channels, height, width), t (batch,) or a scalar -> (batch, out_channels, height, width).

        context (batch, tokens, context_dim) with context_padding_mask (batch, tokens), True = padding token;
        pooled (batch, pooled_dim). Either may be None for an unconditional prediction.
        """
        self._check_inputs(x, context, pooled)
        t = torch.as_tensor(t, device=x.device)
        embedding = self.time_embedding(t.expand(x.shape[0]) if t.ndim == 0 else t)
        if pooled is not None:
            embedding = embedding + self.pooled_proj(pooled)
        conditioning = (embedding, context, context_padding_mask)

        if self.config.patch_size > 1:
            x = F.pixel_unshuffle(x, self.config.patch_size)
        h = self.conv_in(x)
        skips = [h]
        for level in self.down_levels:
            for stage in level.stages:
                h = self._run(stage, h, *conditioning)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self._run(self.mid_stage, h, *conditioning)
        h = self._run(self.mid_residual, h, embedding)
        for level in self.up_levels:
            for stage in level.stages:
                h = torch.cat([h, skips.pop()], dim=1)  # (batch, channels + skip channels, height, width)
                h = self._run(stage, h, *conditioning)
            if level.resample is not None:
                h = level.resample(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.config.patch_size) if self.config.patch_size > 1 else out

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor | None, pooled: torch.Tensor | None) -> None:
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise ValueError(f"expected x of shape (batch, {config.in_channels}, height, width), got {tuple(x.shape)}")
        factor = config.downsampling
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {x.shape[2]}x{x.shape[3]}")
        if context is not None and config.context_dim is None:
            raise ValueError("this UNet has no cross-attention (context_dim is None); it takes no context")
        if context is not None and context.shape[-1] != config.context_dim:
            raise ValueError(f"context width {context.shape[-1]} differs from context_dim {config.context_dim}")
        if pooled is not None and config.pooled_dim is None:
            raise ValueError("this UNet takes no pooled vector (pooled_dim is None)")
        if pooled is not None and pooled.shape[-1] != config.pooled_dim:
            raise ValueError(f"pooled width {pooled.shape[-1]} differs from pooled_dim {config.pooled_dim}")
