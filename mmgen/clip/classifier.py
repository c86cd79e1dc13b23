"""A CLIP image tower with a linear classification head: "replace the output layer" fine-tuning and linear probes.

The head reads the unit-length image embedding. `from_clip` can start it as the zero-shot classifier (the class
names' mean text embeddings, times CLIP's logit scale), so training starts from CLIP's zero-shot accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..hub import PretrainedMixin
from .model import CLIP, CLIPConfig, VisionTower
from .tokenizer import CLIPTokenizer
from .zeroshot import DEFAULT_TEMPLATES, zero_shot_classifier


@dataclass
class CLIPClassifierConfig:
    """The CLIP the image tower comes from (its text tower is not kept) and the class names, in label order."""

    classes: list[str]
    clip: CLIPConfig = field(default_factory=CLIPConfig)

    def __post_init__(self):
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be a non-empty list of distinct names, got {self.classes!r}")


class CLIPClassifier(nn.Module, PretrainedMixin):
    """forward(images) -> class logits (batch, classes) from CLIP's vision tower and a linear head."""

    model_type = "clip-classifier"
    config_class = CLIPClassifierConfig

    def __init__(self, config: CLIPClassifierConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.clip.vision, config.clip)  # named as in CLIP: LoRA targets match
        self.head = nn.Linear(config.clip.embed_dim, len(config.classes))

    @classmethod
    @torch.no_grad()
    def from_clip(cls, clip: CLIP, classes: Sequence[str], head_init: str = "zeroshot",
                  templates: Sequence[str] | None = None) -> "CLIPClassifier":
        """A classifier on a copy of `clip`'s image tower; head_init "zeroshot" (the zero-shot classifier) or "random"."""
        model = cls(CLIPClassifierConfig(list(classes), clip.config))
        model.vision.load_state_dict(clip.vision.state_dict())
        if head_init == "zeroshot":
            tokenizer = CLIPTokenizer(clip.config.text.context_length)
            weights = zero_shot_classifier(clip, tokenizer, classes, templates or DEFAULT_TEMPLATES)
            model.head.weight.copy_(weights * clip.logit_scale_exp())  # (classes, embed_dim)
            model.head.bias.zero_()
        elif head_init != "random":
            raise ValueError(f"head_init must be 'zeroshot' or 'random', got {head_init!r}")
        return model.train(clip.training)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length image embeddings (batch, embed_dim) of normalised images (batch, 3, H, W)."""
        return F.normalize(self.vision(images), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (batch, classes)."""
        return self.head(self.encode_image(images))
