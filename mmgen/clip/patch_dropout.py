"""Patch dropout (FLIP, Li et al. 2023): train a ViT on a random subset of each image's patches."""

from __future__ import annotations

import torch


def drop_patches(tokens: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the class token and a random `1 - fraction` of the patch tokens of each image (at least one).

    tokens: (batch, 1 + patches, width) with the class token first and positions already added; returns
    (batch, 1 + kept, width). The kept patches of each row are drawn from torch's global RNG."""
    batch, length, _ = tokens.shape
    patches = length - 1
    keep = max(1, int(patches * (1.0 - fraction)))
    scores = torch.rand(batch, patches, device=tokens.device)
    kept = scores.topk(keep, dim=-1).indices + 1  # (batch, keep): token positions after the class token
    rows = torch.arange(batch, device=tokens.device)[:, None]
    return torch.cat([tokens[:, :1], tokens[rows, kept]], dim=1)
