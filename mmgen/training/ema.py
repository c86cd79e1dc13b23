"""An exponential moving average of a model's weights, updated by the Trainer after each optimizer step."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..io import load_tensors, save_tensors
from ..run_folder import EMA_WEIGHTS_FILE as EMA_WEIGHTS


class ExponentialMovingAverage:
    """`model` is a copy of the trained model whose trainable parameters follow ema <- d * ema + (1 - d) * current.

    Frozen parameters (requires_grad False, e.g. a pretrained text encoder) are shared with the trained model, not
    copied: they never change, so averaging them would only cost memory. So is the model's `config`: sampling defaults
    an evaluation stores on the average (a chosen guidance scale) are the trained model's too, so its checkpoints
    record them and a resumed run starts from them. Buffers are copied at each update.
    With `warmup`, d = min(decay, (1 + n) / (10 + n)) after n earlier updates, so early weights fade quickly.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        frozen = {id(parameter): parameter for parameter in model.parameters() if not parameter.requires_grad}
        shared = dict(frozen)
        if getattr(model, "config", None) is not None:
            shared[id(model.config)] = model.config
        self.model = copy.deepcopy(model, memo=shared).eval().requires_grad_(False)
        # (name, averaged copy) of every parameter the optimizer trains, in model.named_parameters() order
        self.averaged = [(name, parameter) for name, parameter in self.model.named_parameters()
                         if id(parameter) not in frozen]

    def decay_at(self, updates_before: int) -> float:
        """The decay of the update that follows `updates_before` earlier ones."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + updates_before) / (10 + updates_before))

    @torch.no_grad()
    def update(self, model: nn.Module, updates_before: int) -> None:
        """Move the average towards `model` (the unwrapped trained model) by one step."""
        self.update_averages(model, updates_before)
        for average, buffer in zip(self.model.buffers(), model.buffers()):
            average.copy_(buffer)

    @torch.no_grad()
    def update_averages(self, model: nn.Module, updates_before: int) -> None:
        """Move each averaged parameter towards `model`'s by one step (the buffers are left alone)."""
        weight = 1.0 - self.decay_at(updates_before)
        current = dict(model.named_parameters())
        for name, average in self.averaged:
            average.lerp_(current[name].detach().to(average.dtype), weight)

    def to(self, device: torch.device) -> "ExponentialMovingAverage":
        """Move the averaged copy to `device`."""
        self.model.to(device)
        return self

    def save(self, folder: Path) -> None:
        """Write the averaged parameters to folder/ema.safetensors."""
        save_tensors(folder / EMA_WEIGHTS, dict(self.averaged))

    @torch.no_grad()
    def load(self, folder: Path, model: nn.Module) -> None:
        """Restore the averaged parameters from folder/ema.safetensors and the buffers from `model`."""
        path = folder / EMA_WEIGHTS
        tensors = load_tensors(path)
        names = [name for name, _ in self.averaged]
        if sorted(tensors) != sorted(names):
            raise CheckpointError(f"{path} does not match the model's trainable parameters")
        for name, average in self.averaged:
            if tensors[name].shape != average.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected "
                                      f"{tuple(average.shape)}")
            average.copy_(tensors[name])
        for average, buffer in zip(self.model.buffers(), model.buffers()):
            average.copy_(buffer)
