"""Checkpoints, final/ and EMA of a model sharded by `train.fsdp` (mmgen.training.fsdp).

Two checkpoint layouts, both safetensors + JSON, and resume reads either on any number of processes:
- gathered (default): the very files a single process writes (model folder by the recipe's save_fn,
  optimizer.safetensors + optimizer.json, ema.safetensors), gathered to the main process;
- sharded (`train.fsdp.sharded_checkpoints`): each process writes its own part, `model-shard-R-of-N.safetensors`,
  `optimizer-shard-R-of-N.safetensors`, `ema-shard-R-of-N.safetensors`, with optimizer.json and shards.json (which
  tensors are split along dim 0) from the main process; nothing is gathered, so no process ever holds the whole model.
  Reading concatenates the parts along dim 0 (FSDP2's even split), so the process count may change between runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..hub import _unshared_state_dict
from ..io import load_tensors, read_json, save_tensors, write_json
from ..run_folder import EMA_WEIGHTS_FILE
from . import deepspeed_state
from .checkpoint import optimizer_state_from_files, optimizer_state_to_files
from .ema import ExponentialMovingAverage
from .fsdp import (
    FSDPConfig,
    full_model,
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    local_shards,
    local_tensor,
    materialize,
    meta_skeleton,
    shard_model,
)

SHARDS_FILE = "shards.json"


def _on_any_process(flag: bool, device: torch.device) -> bool:
    count = torch.tensor(float(flag), device=device)
    dist.all_reduce(count)
    return count.item() > 0


def _is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class ShardedExponentialMovingAverage(ExponentialMovingAverage):
    """The EMA of a sharded model: each process averages its own shards (DTensors like the parameters), so EMA costs
    1/N of the trainable weights per process. It has no model of its own: evaluation and final/ get the gathered
    model with the averaged weights (ShardedTraining.gathered_model)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay, self.warmup, self.model = decay, warmup, None
        self.averaged = [(name, parameter.detach().clone()) for name, parameter in model.named_parameters()
                         if parameter.requires_grad]

    def update(self, model: nn.Module, updates_before: int) -> None:
        """Move each shard's average towards the model's shard by one step (no buffers: there is no model copy)."""
        self.update_averages(model, updates_before)

    def to(self, device: torch.device) -> "ShardedExponentialMovingAverage":
        """The averages already live where the shards do."""
        return self

    def full_state(self) -> dict[str, torch.Tensor]:
        """The averaged weights as full tensors on the CPU (collective)."""
        return {name: (average.full_tensor() if _is_sharded(average) else average).cpu()
                for name, average in self.averaged}

    @torch.no_grad()
    def load_full_state(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        """Take this process's shard of each full tensor in `tensors` (read from `path`)."""
        from torch.distributed.tensor import distribute_tensor

        if sorted(tensors) != sorted(name for name, _ in self.averaged):
            raise CheckpointError(f"{path} does not match the model's trainable parameters")
        for name, average in self.averaged:
            full = tensors[name].to(average.dtype)
            if _is_sharded(average):
                full = distribute_tensor(full.to(average.device), average.device_mesh, average.placements,
                                         src_data_rank=None)
            average.copy_(full)


class ShardedTraining:
    """What the Trainer needs for a `train.fsdp` run: the sharded model, its EMA, and checkpoint I/O."""

    def __init__(self, model: nn.Module, config: FSDPConfig, device: torch.device):
        self.config = config
        self.skeleton = meta_skeleton(model)  # taken before sharding: the unsharded structure, without memory
        self.model = shard_model(model, config, device)

    @classmethod
    def create(cls, model: nn.Module, config: FSDPConfig, accelerator) -> "ShardedTraining":
        """Shard `model` in place for the Trainer; refuses a launch whose Accelerate config shards it as well."""
        from accelerate.utils import DistributedType

        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError(f"train.fsdp.enabled=true shards the model itself, but this launch's accelerate config "
                              f"uses {accelerator.distributed_type.value}: launch with configs/accelerate/ddp.yaml "
                              "(or no config), or set train.fsdp.enabled=false to let Accelerate shard")
        return cls(model, config, accelerator.device)

    def evaluate(self, evaluate_fn: Callable | None, ema, step: int, device: torch.device) -> dict:
        """Run a Trainer evaluate_fn (which may work on the main process only) on the gathered model (its EMA when
        on), moved to `device`, on rank 0; every process takes part in the gather. Returns its metrics."""
        if not _on_any_process(evaluate_fn is not None, device):
            return {}
        model = self.gathered_model(ema)
        return evaluate_fn(model.to(device), step) if model is not None and evaluate_fn is not None else {}

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world(self) -> int:
        return dist.get_world_size()

    def make_ema(self, decay: float, warmup: bool) -> ShardedExponentialMovingAverage:
        """An EMA of the sharded weights."""
        return ShardedExponentialMovingAverage(self.model, decay, warmup)

    def prepare(self, accelerator, model: nn.Module, optimizer):
        """The model is sharded already (Accelerate must not wrap it in DDP as well): only the optimizer."""
        return model, accelerator.prepare_optimizer(optimizer)

    # ------------------------------------------------------------------ writing
    def gathered_model(self, ema: ShardedExponentialMovingAverage | None = None) -> nn.Module | None:
        """An unsharded CPU copy of the model (with the EMA weights when given) on rank 0, None elsewhere;
        collective."""
        state = full_model_state(self.model)
        averaged = ema.full_state() if ema is not None else {}
        if self.rank != 0:
            return None
        model = full_model(self.skeleton, state)
        if averaged:
            model.load_state_dict(averaged, strict=False)
        return model

    def save(self, folder: Path, optimizer, ema, save_fn: Callable) -> None:
        """Write the model, optimizer and EMA into the checkpoint folder `folder` (every process calls this)."""
        if self.config.sharded_checkpoints:
            self._save_shards(folder, optimizer, ema)
            return
        model = self.gathered_model()
        optimizer_state = full_optimizer_state(self.model, optimizer)
        averaged = ema.full_state() if ema is not None else None
        if self.rank == 0:
            save_fn(model, folder)
            optimizer_state_to_files(optimizer_state, folder)
            if averaged is not None:
                save_tensors(folder / EMA_WEIGHTS_FILE, averaged)

    def _shard_name(self, stem: str) -> str:
        return f"{stem}-shard-{self.rank:05d}-of-{self.world:05d}.safetensors"

    def _save_shards(self, folder: Path, optimizer, ema) -> None:
        model_state, seen = {}, set()
        for name, tensor in self.model.state_dict().items():  # a tied weight once, under its first name
            local = local_tensor(tensor)
            key = (local.data_ptr(), local.shape, local.stride()) if local.numel() else name
            if key not in seen:
                seen.add(key)
                model_state[name] = tensor
        optimizer_state = optimizer.state_dict()
        optimizer_tensors = {f"{index}.{name}": value for index, values in optimizer_state["state"].items()
                             for name, value in values.items() if torch.is_tensor(value)}
        parts = {"model": model_state, "optimizer": optimizer_tensors}
        if ema is not None:
            parts["ema"] = dict(ema.averaged)
        for stem, tensors in parts.items():
            save_tensors(folder / self._shard_name(stem), local_shards(tensors))
        if self.rank == 0:  # the rest of optimizer_state_to_files' optimizer.json; its tensors are in the shards
            scalars = {f"{index}.{name}": value for index, values in optimizer_state["state"].items()
                       for name, value in values.items() if not torch.is_tensor(value)}
            write_json(folder / "optimizer.json", {"param_groups": optimizer_state["param_groups"], "scalars": scalars})
            write_json(folder / SHARDS_FILE, {"num_shards": self.world, "split": {
                stem: sorted(name for name, tensor in tensors.items() if _is_sharded(tensor))
                for stem, tensors in parts.items()}})

    # ------------------------------------------------------------------ reading
    def load(self, folder: Path, optimizer, ema, load_fn: Callable) -> None:
        """Restore model, optimizer and EMA from either layout (every process calls this; collective)."""
        if (folder / SHARDS_FILE).exists():
            model_tensors, optimizer_tensors, ema_tensors = (_read_shards(folder, stem) for stem in
                                                             ("model", "optimizer", "ema"))
            model = materialize(self.skeleton)
            expected = set(_unshared_state_dict(model))
            if set(model_tensors) != expected:
                raise CheckpointError(f"{folder}: the model shards do not match the model")
            model.load_state_dict(model_tensors, strict=False)
            optimizer_state = optimizer_state_from_files(folder, optimizer_tensors)
        else:
            model = materialize(self.skeleton)
            load_fn(model, folder)
            optimizer_state = optimizer_state_from_files(folder)
            ema_tensors = load_tensors(folder / EMA_WEIGHTS_FILE) if ema is not None else None
        load_full_model_state(self.model, model.state_dict())
        try:
            load_full_optimizer_state(self.model, optimizer, optimizer_state)
        except (ValueError, KeyError, IndexError) as error:
            raise CheckpointError(f"{folder}: optimizer state does not match the model ({error})") from None
        if ema is not None:
            if not ema_tensors:
                raise CheckpointError(f"{folder} holds no EMA weights (train.ema_decay was 0 when it was written)")
            ema.load_full_state(ema_tensors, folder / EMA_WEIGHTS_FILE)


def _read_shards(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """The full tensors of one sharded file set: split tensors concatenated along dim 0, the rest from shard 0."""
    meta = read_json(folder / SHARDS_FILE)
    count = meta.get("num_shards")
    names = sorted(folder.glob(f"{stem}-shard-*-of-{count:05d}.safetensors")) if isinstance(count, int) else []
    if not names:
        if stem == "ema":
            return {}
        raise CheckpointError(f"{folder}: no {stem}-shard-*-of-N.safetensors files for {SHARDS_FILE}'s num_shards")
    if len(names) != count:
        raise CheckpointError(f"{folder}: {len(names)} of {count} {stem} shards present")
    parts = [load_tensors(name) for name in names]
    split = set(meta.get("split", {}).get(stem, []))
    return {name: torch.cat([part[name] for part in parts]) if name in split else tensor
            for name, tensor in parts[0].items()}


class AcceleratedSharding:
    """Checkpoints of a model Accelerate shards itself (an accelerate config with distributed_type FSDP or
    DEEPSPEED, train.fsdp off): the model gathered by `accelerator.get_state_dict` and the whole AdamW state (under
    FSDP through `full_optimizer_state`, under DeepSpeed through mmgen.training.deepspeed_state) into the same files
    one process writes. DeepSpeed ZeRO-2 / ZeRO-3 are tested on CPU (DeepSpeed's CPU accelerator over gloo,
    tests/training/test_deepspeed.py); Accelerate's FSDP has no CPU path, so that branch is untested here. Under
    DeepSpeed, 0-dim parameters are held as (1,) inside the engine and saved / loaded 0-dim
    (deepspeed_state.hold_scalars_as_vectors)."""

    def __init__(self, model: nn.Module, accelerator, config):
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            if config.grad_accum_steps > 1:  # DeepSpeed steps inside accelerator.backward, and scales the loss again
                raise ConfigError("train.grad_accum_steps > 1 with an accelerate DeepSpeed launch: not supported "
                                  "(raise train.batch_size, or use train.fsdp.enabled=true)")
            deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
            # the Trainer prepares no DataLoader, from which DeepSpeed would read the batch size; DeepSpeed clips
            # gradients itself (accelerator.clip_grad_norm_ does nothing under it): train.grad_clip decides
            deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
            deepspeed_config["gradient_clipping"] = config.grad_clip
        self.skeleton = meta_skeleton(model)
        self.model = model
        self.parameter_groups = None  # under DeepSpeed: the optimizer's parameters by group, before it flattens them
        self.held_scalars: set[int] = set()  # under DeepSpeed: the 0-dim parameters the engine holds as (1,)
        self.pending_optimizer_state = None

    def make_ema(self, decay: float, warmup: bool):
        raise ConfigError(f"train.ema_decay with an accelerate {self.accelerator.distributed_type.value} launch: "
                          "use train.fsdp.enabled=true (with configs/accelerate/ddp.yaml) for an EMA of sharded "
                          "weights")

    def prepare(self, accelerator, model: nn.Module, optimizer):
        """Accelerate shards model and optimizer; an optimizer state read on resume is applied now."""
        resumed_weights = None
        if self.deepspeed:
            self.parameter_groups = deepspeed_state.parameter_groups(optimizer)
            if self.pending_optimizer_state is not None:  # the checkpoint's fp32 weights, before any cast to bf16
                resumed_weights = deepspeed_state.trained_values(self.parameter_groups)
            self.held_scalars = deepspeed_state.hold_scalars_as_vectors(model)
        else:
            keep_wrapped_classes_present(accelerator.state.fsdp_plugin, model)
        self.model, prepared_optimizer = accelerator.prepare(model, optimizer)
        if self.pending_optimizer_state is not None and self.deepspeed:
            deepspeed_state.load_fp32_weights(self.parameter_groups, resumed_weights)
            deepspeed_state.load_full_optimizer_state(self.parameter_groups, self.model.optimizer,
                                                      self.pending_optimizer_state)
        elif self.pending_optimizer_state is not None:
            load_full_optimizer_state(self.model, optimizer, self.pending_optimizer_state)
        self.pending_optimizer_state = None
        return self.model, prepared_optimizer

    def gathered_model(self, ema=None) -> nn.Module | None:
        """The whole model in CPU memory on the main process (None elsewhere); collective. Under DeepSpeed its
        trained parameters are the fp32 master weights (the module's own are rounded under bf16 / fp16)."""
        state = self.accelerator.get_state_dict(self.model)  # on the main process
        if self.deepspeed:
            master = deepspeed_state.full_fp32_weights(self.parameter_groups, self.model.module)
            if self.accelerator.is_main_process:
                state = deepspeed_state.declared_shapes({**state, **master}, self.model.module, self.held_scalars)
        return full_model(self.skeleton, {k: v.cpu() for k, v in state.items()}) if self.accelerator.is_main_process \
            else None

    def evaluate(self, evaluate_fn: Callable | None, ema, step: int, device: torch.device) -> dict:
        """As ShardedTraining.evaluate."""
        if not _on_any_process(evaluate_fn is not None, device):
            return {}
        model = self.gathered_model()
        return evaluate_fn(model.to(device), step) if model is not None and evaluate_fn is not None else {}

    def save(self, folder: Path, optimizer, ema, save_fn: Callable) -> None:
        """Write the gathered model and optimizer state into `folder`; collective."""
        model = self.gathered_model()
        if self.deepspeed:
            optimizer_state = deepspeed_state.full_optimizer_state(self.parameter_groups, self.model.optimizer,
                                                                   self.held_scalars)
        else:
            optimizer_state = full_optimizer_state(self.model, optimizer)
        if self.accelerator.is_main_process:
            save_fn(model, folder)
            optimizer_state_to_files(optimizer_state, folder)

    def load(self, folder: Path, optimizer, ema, load_fn: Callable) -> None:
        """Before Accelerate prepares the model: the weights into it; the optimizer state once it is sharded."""
        load_fn(self.model, folder)
        self.pending_optimizer_state = optimizer_state_from_files(folder)


def sharding_for(model: nn.Module, config, accelerator):
    """The Trainer's sharding for TrainConfig `config`: mmgen's FSDP2 (train.fsdp), Accelerate's FSDP / DeepSpeed,
    or None (one process or DDP: the plain checkpoint path)."""
    from accelerate.utils import DistributedType

    if config.fsdp.enabled:
        return ShardedTraining.create(model, config.fsdp, accelerator)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return AcceleratedSharding(model, accelerator, config)
    return None


def keep_wrapped_classes_present(plugin, model: nn.Module) -> None:
    """An accelerate FSDP config names the block classes to wrap (configs/accelerate/fsdp2-*.yaml: TransformerBlock,
    UNetStage), and Accelerate refuses a name the model lacks, so one file could not serve a GPT and a UNet: keep the
    names this model has; none of them is a config error."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plugin is None or plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return
    names = plugin.transformer_cls_names_to_wrap
    if not names:
        return
    present = {type(module).__name__ for module in model.modules()}
    kept = [name for name in names if name in present]
    if not kept:
        raise ConfigError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(names)}, none of which is in the "
                          f"{type(model).__name__}; name its blocks (e.g. TransformerBlock) in the accelerate config")
    plugin.transformer_cls_names_to_wrap = kept
