"""How the Trainer asks Accelerate for this launch's processes (torchrun, `accelerate launch`, or one process).

On a machine without CUDA a multi-process launch needs saying so: Accelerate's `cpu=True` sets up MULTI_CPU (DDP over
gloo) instead of running every process alone. Under an accelerate DeepSpeed launch (`ACCELERATE_USE_DEEPSPEED`),
though, `cpu=True` would silently drop DeepSpeed; DeepSpeed runs on CPU (its CPU accelerator) when Accelerate is told
the process group's backend, gloo, and not `cpu=True`. Accelerate's own FSDP has no CPU path (it only selects FSDP
over a GPU-like device); `train.fsdp` is mmgen's FSDP2 for CPUs.
"""

from __future__ import annotations

import os

import torch


def cpu_only_launch() -> bool:
    """True under torchrun / accelerate launch on a machine without CUDA."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    return launched and not torch.cuda.is_available()


def deepspeed_launch() -> bool:
    """True under `accelerate launch` with a DeepSpeed config (or its environment set by hand)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_on_cpu() -> bool:
    """A DeepSpeed launch of several processes without CUDA: DeepSpeed on its CPU accelerator over gloo."""
    return cpu_only_launch() and deepspeed_launch()


def process_state_options() -> dict:
    """Keyword arguments of `accelerate.PartialState` for this launch."""
    return {"cpu": False, "backend": "gloo"} if deepspeed_on_cpu() else {"cpu": cpu_only_launch()}


def accelerator_options() -> dict:
    """Keyword arguments of `accelerate.Accelerator` (besides mixed precision) for this launch."""
    if deepspeed_on_cpu():
        from accelerate.utils import InitProcessGroupKwargs

        return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": cpu_only_launch()}
