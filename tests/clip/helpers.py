"""Helpers for the CLIP tests: tiny random models with every parameter moved off its initial value."""

import torch

from mmgen.clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig

EOT = 49407  # CLIP's end-of-text id: the largest id of the vocabulary


def tiny_config(**changes) -> CLIPConfig:
    """A CLIP small enough for CPU tests (image 32, patch 8, width 64, context 16)."""
    options = dict(
        embed_dim=48,
        vision=CLIPVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4),
        text=CLIPTextConfig(context_length=16, width=64, layers=2, heads=4),
    )
    options.update(changes)
    return CLIPConfig(**options)


def perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Move norms and biases (zero or one at init) to random values so comparisons cover them."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() <= 1:
                parameter.add_(torch.randn_like(parameter) * scale)


def random_tokens(batch: int, context: int, generator=None) -> torch.Tensor:
    """Start token, random ids, end-of-text at a random position, zero padding: like CLIPTokenizer output."""
    tokens = torch.zeros(batch, context, dtype=torch.long)
    for row in range(batch):
        end = int(torch.randint(2, context, (1,), generator=generator))
        tokens[row, 0] = EOT - 1
        tokens[row, 1:end] = torch.randint(1, EOT - 1, (end - 1,), generator=generator)
        tokens[row, end] = EOT
    return tokens


def make_clip(seed: int = 0, **changes) -> CLIP:
    """A tiny perturbed CLIP in eval mode."""
    torch.manual_seed(seed)
    model = CLIP(tiny_config(**changes))
    perturb(model)
    return model.eval()
