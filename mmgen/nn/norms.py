"""Normalisation layers: LayerNorm and RMSNorm, chosen by name."""

from typing import Literal

import torch
from torch import nn

NormKind = Literal["layernorm", "rmsnorm"]


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): rescale by 1/rms, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: NormKind, dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """A LayerNorm or RMSNorm over the last dimension."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r} (expected 'layernorm' or 'rmsnorm')")
