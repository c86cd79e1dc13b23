"""CLIP's image preprocessing for tensors: its normalisation statistics, and model-side images -> what the tower reads.

It lives with CLIP so that the models using a frozen CLIP (CLIP guidance, the unCLIP decoder) need nothing from the
data package.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Images (batch, 3, H, W) in [-1, 1] -> CLIP-normalised images resized to image_size (what CLIP's tower reads)."""
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype)[:, None, None]
    std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype)[:, None, None]
    if images.shape[-2:] != (image_size, image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                               antialias=True)
    return ((images + 1) / 2 - mean) / std
