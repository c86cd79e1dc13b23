"""FSDP2 sharding for `train.fsdp`: every shared block (each mmgen.nn TransformerBlock, each UNet stage, each CLIP
tower) and then the root become `fully_shard` units, so a process holds 1/N of the parameters, gradients and
optimizer state (ZeRO-3; ZeRO-2 with `reshard_after_forward: false` keeps the parameters gathered between forward
and backward).

The same code runs on GPUs (NCCL) and CPUs (gloo): Accelerate never selects FSDP on a CPU-only launch, so mmgen
applies `fully_shard` itself and Accelerate only provides the process group. What leaves a process is gathered
through torch.distributed.checkpoint's state-dict APIs: a full state dict (on the main process) for checkpoints and
final/, in exactly the files a single process writes, or this process's shards (`sharded_checkpoints`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

# methods besides forward that run a sharded model's parameters: each gathers the root's parameters like forward
FORWARD_METHODS = ("encode_image", "encode_text", "encode_text_tokens", "denoise", "generate")


@dataclass
class FSDPConfig:
    """The `train.fsdp` section: FSDP2 sharding of the model across processes (off by default)."""

    enabled: bool = False
    reshard_after_forward: bool = True  # true: ZeRO-3 (parameters re-sharded after forward); false: ZeRO-2
    cpu_offload: bool = False  # sharded parameters, gradients and optimizer state live in CPU memory (GPUs only)
    mixed_precision: bool = False  # bf16 parameters in forward/backward, gradients reduced in float32
    sharded_checkpoints: bool = False  # checkpoints as one safetensors per process instead of gathered files


def sharded_block_types() -> tuple[type, ...]:
    """The module classes that become their own FSDP unit: mmgen's shared blocks, and CLIP's towers (their
    embeddings would otherwise stay gathered with the root from forward to the end of backward; a UNet level is
    not one: UNet.forward steps into its stages instead of calling it)."""
    from ..clip.model import TextTower, VisionTower
    from ..diffusion.unet import UNetStage
    from ..nn.block import TransformerBlock

    return (TransformerBlock, UNetStage, VisionTower, TextTower)


def ensure_process_group(device: torch.device) -> None:
    """The launch's process group (torchrun's environment), or a one-process group when none was launched (FSDP
    needs a mesh even on one device)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard_model(model: nn.Module, config: FSDPConfig, device: torch.device) -> nn.Module:
    """Apply `fully_shard` to each shared block, then the root (in place); returns the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if config.cpu_offload and device.type != "cuda":
        raise ConfigError("train.fsdp.cpu_offload=true needs GPUs (the model already lives in CPU memory)")
    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options = {"mesh": mesh, "reshard_after_forward": config.reshard_after_forward}
    if config.mixed_precision:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if config.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    model.to(device)
    # FSDP2 shards along dim 0 and refuses 0-dim parameters (CLIP's logit_scale): they stay whole on every process,
    # their gradients averaged by a hook, and their optimizer state replicated
    scalars = {parameter for parameter in model.parameters() if parameter.dim() == 0}
    for parameter in scalars:
        if parameter.requires_grad:
            parameter.register_hook(_average_across_processes)
    blocks = sharded_block_types()
    for module in reversed(list(model.modules())):  # children before their parents
        if module is not model and isinstance(module, blocks):
            fully_shard(module, **options, ignored_params=scalars)
    # the root's own parameters (embeddings, norms and heads outside the blocks) form the last unit
    fully_shard(model, **options, ignored_params=scalars)
    for name in FORWARD_METHODS:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    return model


def _average_across_processes(gradient: torch.Tensor) -> torch.Tensor:
    """The mean of a replicated parameter's gradient over the processes (what FSDP does for the sharded ones)."""
    gradient = gradient.clone()
    dist.all_reduce(gradient)
    return gradient / dist.get_world_size()


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of the unsharded `model` whose parameters live on the meta device (no memory), tied weights kept
    tied; `full_model` fills it with gathered weights so a recipe's save_fn sees an ordinary model."""
    memo = {id(parameter): nn.Parameter(torch.empty_like(parameter, device="meta"), parameter.requires_grad)
            for parameter in model.parameters()}
    return copy.deepcopy(model, memo=memo)


def materialize(skeleton: nn.Module) -> nn.Module:
    """A copy of the skeleton with uninitialised CPU parameters (tied weights still tied)."""
    memo = {id(parameter): nn.Parameter(torch.empty_like(parameter, device="cpu"), parameter.requires_grad)
            for parameter in skeleton.parameters()}
    return copy.deepcopy(skeleton, memo=memo)


def full_model(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The skeleton filled with `state` (a full state dict), in CPU memory: an unsharded model to hand to save_fn."""
    model = materialize(skeleton)
    model.load_state_dict(state)
    return model


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer gathered to full tensors in CPU memory on rank 0 ({} elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Shard a full state dict (every process passes the same one) into the sharded model; collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(full_state_dict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state gathered on rank 0 and keyed like `optimizer.state_dict()` of an unsharded model
    (parameter indices), so the files match a single process's; collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    if "param_groups" not in state:  # not the main process
        return {}
    index = {}
    groups = []
    for group in state["param_groups"]:
        names = group["params"]
        index.update({name: len(index) + offset for offset, name in enumerate(names)})
        groups.append({**group, "params": [index[name] for name in names]})
    return {"state": {index[name]: values for name, values in state["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `full_optimizer_state`: every process passes the same index-keyed full state; collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    # the parameter names in optimizer order, as the state-dict API writes them
    template = get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=False))
    names = [name for group in template["param_groups"] for name in group["params"]]
    by_name = {names[index]: values for index, values in state["state"].items()}
    groups, start = [], 0
    for group in state["param_groups"]:
        groups.append({**group, "params": names[start:start + len(group["params"])]})
        start += len(group["params"])
    set_optimizer_state_dict(model, optimizer, {"state": by_name, "param_groups": groups},
                             options=_options(full_state_dict=True))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_shards(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This process's part of each tensor (a DTensor's local shard; a plain tensor whole), on the CPU."""
    from torch.distributed.tensor import DTensor

    return {name: (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach().cpu()
            for name, tensor in tensors.items()}
