"""Image <-> text retrieval recall@k from paired embeddings (row i of each matrix is one pair)."""

from __future__ import annotations

from typing import Sequence

import torch


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """{"i2t/R@k": ..., "t2i/R@k": ...}: how often the paired item ranks in the top k (ties count against)."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"paired features must have the same shape, got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    similarity = image_features @ text_features.T  # (images, texts)
    results = {}
    for name, scores in (("i2t", similarity), ("t2i", similarity.T)):
        paired = scores.diagonal()[:, None]
        rank = (scores > paired).sum(dim=1)  # how many candidates beat the true pair
        for k in ks:
            results[f"{name}/R@{k}"] = (rank < k).float().mean().item()
    return results
