"""The pre-norm transformer block and a stack of them, shared by GPT, CLIP, the prior and the UNet."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import KVCache, MultiHeadAttention
from .mlp import MLPKind, make_mlp
from .norms import NormKind, make_norm
from .positions import RotaryEmbedding


class TransformerBlock(nn.Module):
    """x + attn(norm(x)) [+ cross_attn(norm(x), context)] + mlp(norm(x)), each residual branch pre-normed.

    norm_position "post" is the original transformer's (and BERT's) order instead: x = norm(x + attn(x)), and so on
    for each branch."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        mlp: MLPKind = "gelu",
        norm: NormKind = "layernorm",
        norm_eps: float = 1e-5,
        bias: bool = True,
        dropout: float = 0.0,
        context_dim: int | None = None,
        norm_position: Literal["pre", "post"] = "pre",
        qkv_bias: bool | None = None,
        upcast_attention: bool = False,
    ):
        """qkv_bias and upcast_attention: see MultiHeadAttention (its `qkv_bias` and `upcast`)."""
        super().__init__()
        if norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {norm_position!r}")
        self.norm_position = norm_position
        hidden = int(dim * mlp_ratio)
        self.norm_attn = make_norm(norm, dim, norm_eps, bias)
        attention = dict(bias=bias, qkv_bias=qkv_bias, dropout=dropout, upcast=upcast_attention)
        self.attn = MultiHeadAttention(dim, num_heads, **attention)
        if context_dim is not None:
            self.norm_cross = make_norm(norm, dim, norm_eps, bias)
            self.cross_attn = MultiHeadAttention(dim, num_heads, context_dim=context_dim, **attention)
        else:
            self.cross_attn = None
        self.norm_mlp = make_norm(norm, dim, norm_eps, bias)
        self.mlp = make_mlp(mlp, dim, hidden, bias=bias, dropout=dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        context_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rotary: RotaryEmbedding | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (batch, seq, dim); context: (batch, context_seq, context_dim) for cross-attention.

        positions: long (batch,): compute the output at one position per row only, (batch, 1, dim) (the other
        positions serve as keys and values): the last block of a model that pools one token."""
        attend = dict(causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask, cache=cache,
                      rotary=rotary, query_positions=positions)
        residual = x if positions is None else x.gather(1, positions.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))
        if self.norm_position == "post":
            x = self.norm_attn(residual + self.attn(x, **attend))
            if self.cross_attn is not None and context is not None:
                x = self.norm_cross(x + self.cross_attn(x, context, key_padding_mask=context_padding_mask))
            return self.norm_mlp(x + self.mlp(x))
        x = residual + self.attn(self.norm_attn(x), **attend)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, key_padding_mask=context_padding_mask)
        return x + self.mlp(self.norm_mlp(x))


class Transformer(nn.Module):
    """A stack of `num_layers` TransformerBlocks, with optional gradient checkpointing per block."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, *, gradient_checkpointing: bool = False, **block_options):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, **block_options) for _ in range(num_layers))
        self.gradient_checkpointing = gradient_checkpointing

    def forward(
        self,
        x: torch.Tensor,
        *,
        caches: list[KVCache] | None = None,
        num_blocks: int | None = None,
        output_positions: torch.Tensor | None = None,
        **options,
    ) -> torch.Tensor:
        """Run every block (the first `num_blocks` only, when given); `caches` holds one KVCache per block for
        incremental decoding. With `output_positions` (long, (batch,)) the result is (batch, dim): the states at
        those positions only, which the last block computes alone (a CLIP tower's class or end-of-text token)."""
        blocks = self.blocks[:num_blocks]
        for index, block in enumerate(blocks):
            cache = caches[index] if caches is not None else None
            if output_positions is not None and index == len(blocks) - 1:
                options = {**options, "positions": output_positions}
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(_run_block, block, x, cache, options, use_reentrant=False)
            else:
                x = block(x, cache=cache, **options)
        return x if output_positions is None else x[:, 0]

    def new_caches(self) -> list[KVCache]:
        """Empty KV caches, one per block."""
        return [KVCache() for _ in self.blocks]


def _run_block(block: TransformerBlock, x: torch.Tensor, cache, options: dict) -> torch.Tensor:
    return block(x, cache=cache, **options)
