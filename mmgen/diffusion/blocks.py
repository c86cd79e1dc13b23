"""UNet building blocks: a conditioned residual block, a spatial transformer, down- and up-sampling."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import TransformerBlock
from ..nn.mlp import MLPKind


class ResidualBlock(nn.Module):
    """Norm-SiLU-conv, the conditioning vector added (or as scale and shift), norm-SiLU-dropout-conv, plus a skip.

    With embedding_dim=None the block is unconditioned (the VAE's): it has no embedding projection and takes none.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embedding_dim: int | None,
        *,
        groups: int = 32,
        dropout: float = 0.0,
        scale_shift_norm: bool = True,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.norm_in = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding_proj = None
        if embedding_dim is not None:
            self.embedding_proj = nn.Linear(embedding_dim, out_channels * (2 if scale_shift_norm else 1))
        self.norm_out = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # the residual branch starts at zero, so a freshly built block is its skip path
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """x (batch, in_channels, height, width), embedding (batch, embedding_dim) -> (batch, out_channels, h, w)."""
        if (embedding is None) != (self.embedding_proj is None):
            needs = "takes no embedding (embedding_dim is None)" if embedding is not None else "needs an embedding"
            raise ValueError(f"this residual block {needs}")
        h = self.conv_in(F.silu(self.norm_in(x)))
        if embedding is None:
            h = self.norm_out(h)
        else:
            condition = self.embedding_proj(F.silu(embedding))[:, :, None, None]  # (batch, (2 *) channels, 1, 1)
            if self.scale_shift_norm:
                # ADM's AdaGN (Dhariwal & Nichol 2021): the embedding scales and shifts the normalised features
                scale, shift = condition.chunk(2, dim=1)
                h = self.norm_out(h) * (1 + scale) + shift
            else:
                h = self.norm_out(h + condition)
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SpatialTransformer(nn.Module):
    """x + proj_out(TransformerBlocks(proj_in(GroupNorm(x)))) over the height * width positions of a feature map.

    Each of the `depth` blocks self-attends across positions and, when `context_dim` is set, cross-attends to a
    context sequence. proj_in / proj_out are linear maps of the channels (what Stable Diffusion 1's 1x1 convolutions
    compute too). mlp, qkv_bias and upcast_attention: see TransformerBlock; norm_eps: the GroupNorm's.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        *,
        context_dim: int | None = None,
        groups: int = 32,
        dropout: float = 0.0,
        depth: int = 1,
        mlp: MLPKind = "gelu",
        qkv_bias: bool = True,
        upcast_attention: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=norm_eps)
        self.proj_in = nn.Linear(channels, channels)
        block_options = dict(context_dim=context_dim, dropout=dropout, mlp=mlp, qkv_bias=qkv_bias,
                             upcast_attention=upcast_attention)
        self.block = TransformerBlock(channels, num_heads, **block_options)
        # the first block keeps its name ("block"), so folders of depth-1 models written before `depth` still load
        self.further_blocks = nn.ModuleList(
            TransformerBlock(channels, num_heads, **block_options) for _ in range(depth - 1)
        )
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (batch, channels, height, width); context (batch, tokens, context_dim); mask (batch, tokens).

        True in context_padding_mask marks a padding token, which is not attended to.
        """
        batch, channels, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (batch, height * width, channels)
        h = self.block(self.proj_in(h), context=context, context_padding_mask=context_padding_mask)
        for block in self.further_blocks:
            h = block(h, context=context, context_padding_mask=context_padding_mask)
        h = self.proj_out(h).transpose(1, 2).reshape(batch, channels, height, width)
        return x + h


class Downsample(nn.Module):
    """Halve height and width with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double height and width: nearest-neighbour repeat, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
