"""Contrastive losses of CLIP (softmax InfoNCE) and SigLIP (pairwise sigmoid), single- or multi-process.

With several processes (torch.distributed initialised, world size > 1) every process passes its local
batch of features (the same local batch size on every process: use drop_last). The features of all
processes are gathered with `torch.distributed.nn.functional.all_gather`, whose backward sends each
process the gradient of every process's loss with respect to its own shard, and each process scores
its local rows against all gathered columns (open_clip's `local_loss=True, gather_with_grad=True`).

Scaling: the mean of the per-process losses equals the loss of one process on the concatenated batch,
and so does the gradient after DDP averages it over processes. (The gradient reaching a process's own
features is `world_size` times the single-process one, because it sums all processes' losses; DDP's
division by `world_size` cancels that.)
"""

from __future__ import annotations

import warnings

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """All processes' features (world_size * batch, dim) in rank order; gradients flow back to every shard."""
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # deprecated in favour of a private, gradient-free collective: nothing public replaces it yet
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)
        return torch.cat(all_gather(features), dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of the image->text and text->image cross-entropies, matching pairs on the diagonal."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of local features (batch, dim) against all processes' features; logit_scale is exp()'d already."""
        rank, world_size = _rank_and_world_size()
        all_images, all_texts = image_features, text_features
        if world_size > 1:
            all_images, all_texts = gather_with_grad(image_features), gather_with_grad(text_features)
        logits_per_image = logit_scale * image_features @ all_texts.T  # (batch, world_size * batch)
        logits_per_text = logit_scale * text_features @ all_images.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        batch = image_features.shape[0]
        labels = torch.arange(batch, device=image_features.device) + rank * batch  # local row i pairs with column
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss (Zhai et al. 2023): -log sigmoid(label * logit) summed over all pairs, divided by the local batch.

    Labels are +1 for matching pairs and -1 elsewhere. As in open_clip the sum is divided by the LOCAL batch
    size: with N = world_size * batch, each process sums batch * N terms over `batch`, so the mean over processes
    is the single-process loss on N rows (N * N terms over N), and DDP's averaged gradient equals its gradient.
    With several processes, the text features are gathered (with gradients) and the local images are scored
    against all texts, which gives the same value as open_clip's neighbour-exchange implementation.
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of local image features (batch, dim) against all processes' text features."""
        rank, world_size = _rank_and_world_size()
        all_texts = gather_with_grad(text_features) if world_size > 1 else text_features
        logits = logit_scale * image_features @ all_texts.T  # (batch, world_size * batch)
        if logit_bias is not None:
            logits = logits + logit_bias
        batch = image_features.shape[0]
        rows = torch.arange(batch, device=logits.device)
        labels = -torch.ones_like(logits)
        labels[rows, rows + rank * batch] = 1.0
        return -F.logsigmoid(labels * logits).sum() / batch
