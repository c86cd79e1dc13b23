"""A mixin for models that carry a frozen, pretrained CLIP beside the network they train (text-to-image, unCLIP
prior and decoder): the CLIP stays in eval mode whatever `train()` says, and it encodes the prompts' tokens."""

from __future__ import annotations

import torch
from torch import nn

from .model import CLIP, TextEncoding


class FrozenCLIPMixin:
    """Put it before nn.Module among the bases. `frozen_clip_attribute` names the CLIP submodule; a class with more
    frozen parts (a VAE) lists them in `frozen_modules`."""

    frozen_clip_attribute = "clip"

    @property
    def frozen_clip(self) -> CLIP:
        """The frozen CLIP."""
        return getattr(self, self.frozen_clip_attribute)

    def frozen_modules(self) -> list[nn.Module]:
        """The pretrained parts that never train (kept in eval mode)."""
        return [self.frozen_clip]

    def train(self, mode: bool = True):
        """Set the trained network's mode; the frozen parts always stay in eval mode."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    @property
    def context_length(self) -> int:
        """The CLIP text tower's (and tokenizer's) context length."""
        return self.frozen_clip.config.text.context_length

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> TextEncoding:
        """Token states, unit-length pooled text embeddings and padding mask of CLIP tokens (batch, seq)."""
        return self.frozen_clip.encode_text_tokens(tokens)
