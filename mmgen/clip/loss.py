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

Several captions per image (`caption_mask`, data.captions_per_image: all): `text_features` are then the captions of
all images one after the other (T, dim), and `caption_mask` (batch, max_captions) says which of each image's slots
hold one (T = caption_mask.sum(); row-major order, every image has at least one). Every caption of an image is a
positive of that image; see `ClipLoss` and `SigLipLoss` for what each loss makes of that. Processes may hold different
numbers of captions: the gather pads them to (batch * max_captions) rows.
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


def _all_captions(text_features: torch.Tensor, caption_mask: torch.Tensor, rank: int, world_size: int):
    """(every process's captions (T_all, dim), the global image index of each (T_all,), the local captions' global
    image indices (T,)), captions in rank order; gradients flow back to each process's own captions."""
    batch = caption_mask.shape[0]
    local_owners = caption_mask.nonzero()[:, 0] + rank * batch  # row-major: the order of text_features
    if world_size == 1:
        return text_features, local_owners, local_owners
    slots = caption_mask.reshape(-1, 1)
    padded = text_features.new_zeros(slots.shape[0], text_features.shape[1]).masked_scatter(slots, text_features)
    all_masks = [torch.empty_like(caption_mask) for _ in range(world_size)]
    dist.all_gather(all_masks, caption_mask.contiguous())
    all_mask = torch.cat(all_masks)  # (world_size * batch, max_captions)
    all_texts = gather_with_grad(padded)[all_mask.reshape(-1)]  # (T_all, dim)
    return all_texts, all_mask.nonzero()[:, 0], local_owners


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of the image->text and text->image cross-entropies, matching pairs on the diagonal.

    With several captions per image (`caption_mask`) it is the multi-positive InfoNCE with soft targets (as in
    UniCL and multi-positive CLIP variants): image->text is the cross-entropy against the target 1/k on each of the
    image's k captions, which is the mean over its captions of -log softmax (the softmax running over every caption
    of the batch); text->image is each caption's cross-entropy with its own image as the one positive, averaged over
    all captions. (Not MIL-NCE's -log of the summed probabilities of the positives, which lets one caption take all
    the mass.) With one caption per image both are the loss above."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of local features (batch, dim) against all processes' features; logit_scale is exp()'d already.
        With `caption_mask` (batch, max_captions), text_features are every image's captions (module docstring)."""
        rank, world_size = _rank_and_world_size()
        if caption_mask is not None:
            return _multi_positive_infonce(image_features, text_features, logit_scale, logit_bias, caption_mask)
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


def _multi_positive_infonce(image_features, text_features, logit_scale, logit_bias, caption_mask) -> torch.Tensor:
    """ClipLoss with several captions per image (see its docstring)."""
    rank, world_size = _rank_and_world_size()
    all_texts, text_owners, local_owners = _all_captions(text_features, caption_mask, rank, world_size)
    all_images = gather_with_grad(image_features) if world_size > 1 else image_features
    logits_per_image = logit_scale * image_features @ all_texts.T  # (batch, T_all)
    logits_per_text = logit_scale * text_features @ all_images.T  # (T, world_size * batch)
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    images = torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
    positive = text_owners[None, :] == images[:, None]  # (batch, T_all): the image's own captions
    log_probs = F.log_softmax(logits_per_image, dim=-1)
    image_to_text = -(log_probs.where(positive, 0.0).sum(-1) / positive.sum(-1)).mean()
    # the mean over all processes' captions: this process's sum over (T_all / world_size), so that the mean of
    # the per-process losses is the single-process loss even when processes hold different numbers of captions
    text_to_image = F.cross_entropy(logits_per_text, local_owners, reduction="sum") / (len(text_owners) / world_size)
    return (image_to_text + text_to_image) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss (Zhai et al. 2023): -log sigmoid(label * logit) summed over all pairs, divided by the local batch.

    Labels are +1 for matching pairs and -1 elsewhere. As in open_clip the sum is divided by the LOCAL batch
    size: with N = world_size * batch, each process sums batch * N terms over `batch`, so the mean over processes
    is the single-process loss on N rows (N * N terms over N), and DDP's averaged gradient equals its gradient.
    With several processes, the text features are gathered (with gradients) and the local images are scored
    against all texts, which gives the same value as open_clip's neighbour-exchange implementation.

    With several captions per image (`caption_mask`) it is naturally multi-positive: every (image, own caption) pair
    has label +1, every other pair -1, and the sum over all (image, caption) pairs is still divided by the local
    number of images.
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of local image features (batch, dim) against all processes' text features (with `caption_mask`
        (batch, max_captions), every image's captions: module docstring)."""
        rank, world_size = _rank_and_world_size()
        batch = image_features.shape[0]
        rows = torch.arange(batch, device=image_features.device)
        if caption_mask is not None:
            all_texts, text_owners, _ = _all_captions(text_features, caption_mask, rank, world_size)
        else:
            all_texts = gather_with_grad(text_features) if world_size > 1 else text_features
            text_owners = torch.arange(all_texts.shape[0], device=all_texts.device)
        logits = logit_scale * image_features @ all_texts.T  # (batch, all captions)
        if logit_bias is not None:
            logits = logits + logit_bias
        labels = torch.where(text_owners[None, :] == (rows + rank * batch)[:, None], 1.0, -1.0).to(logits.dtype)
        return -F.logsigmoid(labels * logits).sum() / batch
