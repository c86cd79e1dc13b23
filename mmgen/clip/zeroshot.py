"""Zero-shot classification with CLIP: class names + prompt templates -> classifier weights -> probabilities."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from ..errors import UserError

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                         batch_size: int = 256) -> torch.Tensor:
    """Unit-length weights (num_classes, embed_dim): each class's mean text embedding over the templates."""
    class_names = [name.strip() for name in class_names]
    if not class_names or any(not name for name in class_names):
        raise UserError("zero-shot classification needs a non-empty name for every class")
    if len(set(class_names)) != len(class_names):
        raise UserError("class names must be distinct")
    if not templates or any("{}" not in template for template in templates):
        raise UserError("every prompt template needs a {} where the class name goes")
    prompts = [template.format(name) for name in class_names for template in templates]
    device = next(model.parameters()).device
    embeddings = torch.cat([
        model.encode_text(tokenizer(prompts[start : start + batch_size]).to(device))
        for start in range(0, len(prompts), batch_size)
    ])
    embeddings = embeddings.view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(embeddings, dim=-1)


@torch.no_grad()
def classify(model, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Class probabilities (batch, num_classes) of normalised images (batch, 3, H, W)."""
    device = next(model.parameters()).device
    features = model.encode_image(images.to(device))
    return (model.logit_scale_exp() * features @ classifier.T).softmax(dim=-1)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest scores, for each k (capped at the number of classes)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None].to(ranked.device)
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}
