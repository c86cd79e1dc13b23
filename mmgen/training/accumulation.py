"""What the Trainer hands an objective that takes a whole step's micro-batches at once (`loss_fn.takes_whole_step`).

Such an objective (CLIP's cached-feature contrastive accumulation, mmgen.clip.objective) runs several forward and
backward passes per optimizer step and needs three things only the Trainer knows: the mixed-precision autocast, a
gradient pass that lets distributed training synchronise gradients on the last backward only, and the backward that
applies fp16's loss scaling. It also needs to replay the RNG of a pass exactly (`rng_state` / `set_rng_state`).
"""

from __future__ import annotations

import contextlib

import torch


class GradientPasses:
    """The Trainer's autocast, per-pass gradient synchronisation and backward for one optimizer step of `model`."""

    def __init__(self, accelerator, model: torch.nn.Module):
        self.accelerator, self.model = accelerator, model

    def autocast(self):
        """The run's mixed-precision context (for passes without gradients too)."""
        return self.accelerator.autocast()

    @contextlib.contextmanager
    def gradient_pass(self, last: bool):
        """Context for the forward of one gradient pass: under DDP, gradients synchronise only in the `last` one."""
        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
        with sync, self.accelerator.autocast():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one pass's loss (scaled under fp16); gradients add up until the optimizer step."""
        self.accelerator.backward(loss)

    def rng_state(self) -> tuple:
        """The global RNG state of the CPU and of this process's accelerator (what dropout-like draws consume)."""
        device = self.accelerator.device
        return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def set_rng_state(self, state: tuple) -> None:
        """Put back a state from `rng_state`: the next draws repeat those made after it was taken."""
        cpu, accelerator = state
        torch.set_rng_state(cpu)
        if accelerator is not None:
            torch.cuda.set_rng_state(accelerator, self.accelerator.device)
