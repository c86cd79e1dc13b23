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


# the multi-device type Accelerate's PartialState gives each kind of device (accelerate.state.PartialState)
_MULTI_DEVICE_TYPES = {"cuda": "MULTI_GPU", "npu": "MULTI_NPU", "xpu": "MULTI_XPU", "mlu": "MULTI_MLU",
                       "musa": "MULTI_MUSA", "sdaa": "MULTI_SDAA", "hpu": "MULTI_HPU", "neuron": "MULTI_NEURON",
                       "cpu": "MULTI_CPU"}


def reset_accelerator_state() -> None:
    """Forget an earlier Accelerator of this process (its precision, plugins), keeping the process group.

    Accelerate writes the type its Accelerator chose back into the process-wide PartialState; with FSDP written there,
    the next Accelerator of the process no longer reads the FSDP plugin (it does only over a multi-device type) and
    fails at prepare (seen on an H100: a second Trainer under an accelerate FSDP launch, e.g. --resume in the same
    process). The launch's multi-device type is put back."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state(reset_partial_state=False)
    shared = PartialState._shared_state
    if shared.get("distributed_type") == DistributedType.FSDP:
        device = shared.get("device")
        name = _MULTI_DEVICE_TYPES.get(device.type if device is not None else "cuda", "MULTI_GPU")
        shared["distributed_type"] = getattr(DistributedType, name, DistributedType.MULTI_GPU)
