"""Sequence classifiers: a GPT or masked-LM backbone whose output layer is replaced by a classification head.

A GPT reads left to right, so only its last real token has seen the whole text: pooling "last" reads the hidden
state of the last non-padding token (right padding does not change it). A masked LM sees the whole text at every
position: pooling "first" reads position 0, "mean" the average over the non-padding tokens. The backbone keeps its
names (`backbone.transformer...`), so LoRA targets match, and loses its vocabulary head, which a classifier never uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..hub import PretrainedMixin
from .gpt import GPT, GPTConfig
from .mlm import MaskedLM, MLMConfig


@dataclass
class TextClassifierConfig:
    """The class names (in label order), the pooling, and the backbone's config: exactly one of gpt and mlm."""

    classes: list[str]
    pooling: Literal["last", "first", "mean"] = "last"
    gpt: GPTConfig | None = None
    mlm: MLMConfig | None = None

    def __post_init__(self):
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be at least two distinct names, got {self.classes!r}")
        if (self.gpt is None) == (self.mlm is None):
            raise ValueError("give exactly one backbone config: gpt or mlm")
        if self.gpt is not None and self.pooling == "first":
            raise ValueError("a GPT's first token sees only itself: use pooling 'last' or 'mean'")

    @property
    def context_length(self) -> int:
        return (self.gpt or self.mlm).context_length


class TextClassifier(nn.Module, PretrainedMixin):
    """forward(tokens, padding_mask) -> class logits (batch, classes)."""

    model_type = "text-classifier"
    config_class = TextClassifierConfig

    def __init__(self, config: TextClassifierConfig):
        super().__init__()
        self.config = config
        if config.gpt is not None:
            self.backbone = GPT(config.gpt)
            self.backbone.lm_head = None  # tied to the token embedding, which stays
            dim = config.gpt.dim
        else:
            self.backbone = MaskedLM(config.mlm)
            self.backbone.head_transform = self.backbone.head_norm = self.backbone.lm_head = None
            dim = config.mlm.dim
        self.head = nn.Linear(dim, len(config.classes))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_backbone(cls, backbone: GPT | MaskedLM, classes: list[str], pooling: str | None = None):
        """A classifier on a copy of a trained GPT's or masked LM's weights, with a fresh head."""
        is_gpt = isinstance(backbone, GPT)
        pooling = pooling or ("last" if is_gpt else "mean")
        config = TextClassifierConfig(list(classes), pooling, gpt=backbone.config if is_gpt else None,
                                      mlm=None if is_gpt else backbone.config)
        model = cls(config)
        wanted = model.backbone.state_dict()
        model.backbone.load_state_dict({name: tensor for name, tensor in backbone.state_dict().items()
                                        if name in wanted})
        return model.train(backbone.training)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, seq), right-padded; padding_mask bool (batch, seq), True marks padding."""
        if padding_mask is None:
            padding_mask = torch.zeros_like(tokens, dtype=torch.bool)
        if self.config.gpt is not None:
            hidden = self.backbone.hidden_states(tokens)  # causal: right padding never reaches a real token
        else:
            hidden = self.backbone.encode(tokens, padding_mask)
        return self.head(pool(hidden, padding_mask, self.config.pooling))


def pool(hidden: torch.Tensor, padding_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector (batch, dim) per sequence of hidden (batch, seq, dim): the last real token, the first, or the mean
    over the real tokens."""
    real = (~padding_mask).to(hidden.dtype)  # (batch, seq)
    if pooling == "first":
        return hidden[:, 0]
    if pooling == "mean":
        return (hidden * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp(min=1)
    last = (real.sum(dim=1).long() - 1).clamp(min=0)  # right padding: the last real token's index
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
