"""The frozen reference model of preference tuning (DPO, Diffusion-DPO): what the policy is compared against.

With LoRA the reference is the policy itself with its adapters switched off: the base weights are exactly the
frozen ones, so no second copy is held. Full fine-tuning changes the base weights, so there the reference is a
frozen copy taken before training starts (on --resume too: the Trainer loads the checkpoint after it is taken).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block `model` computes what its base computes: every peft LoRA layer is switched off (then on).

    Only layers that were enabled are switched back on, so nested use and other code's choices are left alone."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    switched = [layer for layer in model.modules() if isinstance(layer, BaseTunerLayer) and not layer.disable_adapters]
    for layer in switched:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in switched:
            layer.enable_adapters(True)


class FrozenReference:
    """reference(policy) is a context giving the reference model: `policy` with adapters disabled when it carries
    LoRA adapters, else a frozen copy of the model as it was when this object was made.

    Inside the context the reference runs in eval mode (no dropout) under torch.no_grad(); the policy's own mode
    is restored afterwards."""

    def __init__(self, model: nn.Module):
        self.copy = None
        if getattr(model, "lora_state", None) is None:
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)

    @contextlib.contextmanager
    def __call__(self, policy: nn.Module) -> Iterator[nn.Module]:
        if self.copy is not None:
            self.copy.to(next(policy.parameters()).device)  # the Trainer moves the policy, not this copy
            with torch.no_grad():
                yield self.copy
            return
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), adapters_disabled(policy):
                yield policy
        finally:
            policy.train(was_training)
