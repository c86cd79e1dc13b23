"""Position information: learned absolute embeddings and rotary embeddings (RoPE)."""

import torch
from torch import nn


class LearnedPositions(nn.Module):
    """A learned vector per position, added to token embeddings (GPT-2, CLIP)."""

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.zeros(max_positions, dim))

    def forward(self, length: int, offset: int = 0) -> torch.Tensor:
        """Embeddings of positions offset..offset+length-1, shape (length, dim)."""
        if offset + length > self.max_positions:
            raise ValueError(f"sequence of {offset + length} positions exceeds the model's {self.max_positions}")
        return self.weight[offset : offset + length]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), "rotate half" layout, applied to queries and keys."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        inverse_frequency = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inverse_frequency", inverse_frequency, persistent=False)
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _cos_sin(self, length: int, device, dtype):
        if self._cache is None or self._cache[0] < length or self._cache[1].device != device:
            positions = torch.arange(max(length, 256), device=device, dtype=torch.float32)
            angles = torch.outer(positions, self.inverse_frequency.to(device))
            angles = torch.cat([angles, angles], dim=-1)  # (positions, head_dim)
            sin = angles.sin()
            half = sin.shape[-1] // 2
            # sin with its first half negated: rotate-half's cat([-second, first]) * sin is then roll(x) * signed_sin
            # (the same products, bit for bit: negation is exact), one kernel fewer and no chunk + cat
            self._cache = (angles.shape[0], angles.cos(), torch.cat([-sin[:, :half], sin[:, half:]], dim=-1))
        _, cos, signed_sin = self._cache
        return cos[:length].to(dtype), signed_sin[:length].to(dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        """Rotate q, k of shape (batch, heads, seq, head_dim) for positions offset..offset+seq-1."""
        return self.rotate(q, offset), self.rotate(k, offset)

    def rotate(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate x (..., seq, head_dim) for positions offset..offset+seq-1; queries and keys stacked in one x are
        rotated in one pass (what self-attention does: fewer, larger kernels than one call each)."""
        length = x.shape[-2]
        cos, signed_sin = self._cos_sin(offset + length, x.device, x.dtype)
        return x * cos[offset:] + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin[offset:]
