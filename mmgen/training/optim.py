"""AdamW with decay / no-decay parameter groups, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear and embedding weights) are decayed; biases, norm scales and other vectors are not."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8):
    """AdamW over `parameter_groups`, with the fused kernel (one op for all tensors, CPU and GPU)."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=True)


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str = "cosine") -> float:
    """LR for optimizer step `step` (0-based): linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant" or step >= max_steps:
        return lr if schedule == "constant" else min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
