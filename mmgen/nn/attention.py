"""Multi-head attention, defined once for every model in mmgen.

Self- and cross-attention on `torch.nn.functional.scaled_dot_product_attention` (FlashAttention /
memory-efficient kernels on GPU when no explicit mask is needed), with causal and key-padding masks,
rotary positions and a KV cache for incremental decoding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .positions import RotaryEmbedding


class KVCache:
    """Keys and values of the positions seen so far by one attention layer."""

    def __init__(self):
        self.keys: torch.Tensor | None = None  # (batch, heads, seq, head_dim)
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions and return keys and values of all positions."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
        return self.keys, self.values


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention, or cross-attention to a context of width `context_dim` when that is given."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context_dim: int | None = None,
        bias: bool = True,
        qkv_bias: bool | None = None,
        dropout: float = 0.0,
        upcast: bool = False,
    ):
        """qkv_bias: whether the query/key/value projections have a bias (None: as `bias`, which the output
        projection always follows; Stable Diffusion's UNet has none there). upcast: attend in float32 whatever the
        input's dtype (Stable Diffusion 2.1's `upcast_attention`, which keeps float16 scores from overflowing)."""
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.is_cross_attention = context_dim is not None
        self.upcast = upcast
        qkv_bias = bias if qkv_bias is None else qkv_bias
        if self.is_cross_attention:
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv_proj = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv_proj = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # one matmul for queries, keys and values
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = dropout
        self.out_dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        return self._stacked_heads(x, parts).unbind(0)  # each (batch, heads, seq, head_dim)

    def _stacked_heads(self, x: torch.Tensor, parts: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rotary: RotaryEmbedding | None = None,
        query_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from x (batch, seq, dim) to itself or to `context` (batch, context_seq, context_dim).

        key_padding_mask: bool (batch, key_seq), True marks padding keys that are ignored.
        attn_mask: bool (True = may attend) or additive float, broadcastable to (batch, heads, seq, key_seq).
        cache: a KVCache for incremental decoding of self-attention; new positions follow the cached ones.
        query_positions: long (batch,): self-attention from one position per row only (every position still a key
        and value); the output is (batch, 1, dim), equal to that row's position in the full output. A model that
        reads one pooled token of its last layer skips the rest of that layer with it.
        """
        if query_positions is not None and (self.is_cross_attention or cache is not None or attn_mask is not None):
            raise ValueError("query_positions is for self-attention without a cache or an explicit attn_mask")
        past = len(cache) if cache is not None else 0
        if self.is_cross_attention:
            if context is None:
                raise ValueError("cross-attention needs a context")
            if cache is not None or rotary is not None or causal:
                raise ValueError("cross-attention takes no cache, rotary positions or causal mask")
            (q,) = self._heads(self.q_proj(x), 1)
            k, v = self._heads(self.kv_proj(context), 2)
        else:
            if context is not None:
                raise ValueError("this is a self-attention layer (built without context_dim); it takes no context")
            qkv = self._stacked_heads(self.qkv_proj(x), 3)  # (3, batch, heads, seq, head_dim)
            if rotary is not None:  # queries and keys rotated together: one pass instead of two
                qk, v = qkv.split((2, 1))  # split, not indexing: its backward is one cat, not zero-filled copies
                q, k = rotary.rotate(qk, offset=past).unbind(0)
                v = v.squeeze(0)
            else:
                q, k, v = qkv.unbind(0)
        if cache is not None:
            k, v = cache.append(k, v)
        if query_positions is not None:
            q = q.gather(2, query_positions.view(-1, 1, 1, 1).expand(q.shape[0], q.shape[1], 1, q.shape[3]))
            mask, is_causal = _one_query_mask(query_positions, k.shape[-2], causal, key_padding_mask), False
        else:
            mask, is_causal = _combine_masks(q.shape[-2], k.shape[-2], past, causal, key_padding_mask, attn_mask,
                                             q.device)
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
            if mask is not None and mask.dtype != torch.bool:
                mask = mask.float()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.to(dtype).transpose(1, 2).flatten(2)  # (batch, seq, dim)
        return self.out_dropout(self.out_proj(out))


def _one_query_mask(positions, key_len, causal, key_padding_mask):
    """The SDPA mask (batch, 1, 1, key_seq) of one query per row at `positions` (batch,), or None."""
    mask = None
    if causal:  # the query at position p sees keys 0..p
        mask = (torch.arange(key_len, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]
    if key_padding_mask is not None:
        keep = ~key_padding_mask.bool()[:, None, None, :]
        mask = keep if mask is None else mask & keep
    return mask


def _combine_masks(query_len, key_len, past, causal, key_padding_mask, attn_mask, device):
    """One SDPA mask from causal / padding / explicit masks; (None, True) keeps the fused causal kernel."""
    if causal and past == 0 and key_padding_mask is None and attn_mask is None:
        return None, query_len > 1
    mask = None
    if causal and query_len > 1:
        # query i sits at absolute position past + i and may see keys 0..past + i
        mask = torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(diagonal=past)
    if key_padding_mask is not None:
        keep = ~key_padding_mask.bool()[:, None, None, :]  # (batch, 1, 1, key_seq)
        mask = keep if mask is None else mask & keep
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask = attn_mask if mask is None else mask & attn_mask
        elif mask is None:
            mask = attn_mask
        else:
            mask = attn_mask.masked_fill(~mask, float("-inf"))
    return mask, False
