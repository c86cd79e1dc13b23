"""Checkpoint state of a model DeepSpeed ZeRO-2 / ZeRO-3 partitions, in the files one process writes.

DeepSpeed keeps fp32 master weights and Adam's state of each parameter group as one flat fp32 partition per process;
`safe_get_full_fp32_param` / `safe_get_full_optimizer_state` gather one parameter's slice of them, and the `safe_set_`
counterparts write it back. Keyed by parameter index like `optimizer.state_dict()` (and
`mmgen.training.fsdp.full_optimizer_state`), the state goes into the same optimizer.safetensors + optimizer.json every
other launch writes, so a checkpoint resumes with or without DeepSpeed. Nothing here uses DeepSpeed's own checkpoints
(pickles). Written against DeepSpeed 0.19 (two private hooks of its ZeRO optimizers are named where used).

DeepSpeed cannot prepare a 0-dim parameter (CLIP's logit_scale): the engine holds each as a 1-element vector
(`hold_scalars_as_vectors`), and the checkpoint state here gives it back 0-dim (`declared_shapes`), so the files are
those of one process.
"""

from __future__ import annotations

import torch
from torch import nn

MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's per-parameter tensors; "step" is one count per flat partition


Groups = list[tuple[list[nn.Parameter], list[str]]]


def parameter_groups(optimizer: torch.optim.Optimizer) -> Groups:
    """Each group's parameters (in optimizer order) and hyperparameter names, taken before DeepSpeed replaces the
    parameters by flat partitions (and, under optimizer offload, the optimizer by DeepSpeedCPUAdam, which adds its own
    names to the same group dicts)."""
    return [(list(group["params"]), [key for key in group if key != "params"]) for group in optimizer.param_groups]


def hold_scalars_as_vectors(model: nn.Module) -> set[int]:
    """Reshape the data of every 0-dim parameter of `model` to (1,) before DeepSpeed builds its engine: DeepSpeed
    0.19's initial broadcast views each parameter as bytes (`p.data.view(torch.uint8)`), which a 0-dim tensor refuses.
    Each stays the same Parameter (the optimizer's groups still hold it); the model must read it shape-agnostically
    (CLIP's `logit_scale_exp()` reshapes to ()). Returns the ids of the parameters held so."""
    held = set()
    for parameter in model.parameters():
        if parameter.dim() == 0:
            parameter.data = parameter.data.reshape(1)
            held.add(id(parameter))
    return held


def declared_shapes(state: dict[str, torch.Tensor], module: nn.Module, held: set[int]) -> dict[str, torch.Tensor]:
    """`state` (a state dict of `module`, by any of its names) with each parameter in `held` back to 0-dim."""
    scalars = {name for name, parameter in module.named_parameters(remove_duplicate=False) if id(parameter) in held}
    return {name: value.reshape(()) if name in scalars else value for name, value in state.items()}


def _step_count(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Adam's step count as torch's AdamW stores it (a float32 tensor): every flat partition steps together, so any
    of them holds it (None before a step). DeepSpeedCPUAdam (optimizer offload) counts in a Python int."""
    for state in optimizer.state.values():
        if "step" in state:
            return torch.as_tensor(state["step"], dtype=torch.float32).detach().cpu().clone()
    return None


def _flat_partitions(zero_optimizer) -> list[torch.Tensor]:
    """This process's flat fp32 partitions, the tensors Adam's state is keyed by (ZeRO-3; ZeRO 1-2)."""
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):
        return list(zero_optimizer.fp32_partitioned_groups_flat)
    return list(zero_optimizer.single_partition_of_fp32_groups)


def _link_state(zero_optimizer) -> None:
    """Point each parameter's slice at its group's Adam state. ZeRO 1-2 links them once, after the first group's
    first step, when the other groups have no state yet (their slices then stay empty): linked again here."""
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-3 looks the state up each time
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def full_optimizer_state(groups: Groups, zero_optimizer, held: set[int] = frozenset()) -> dict:
    """The whole Adam state, index-keyed, on every process (CPU tensors); collective. `zero_optimizer` is
    DeepSpeed's ZeRO optimizer (the engine's `optimizer`), whose own `optimizer` steps the flat partitions: the
    Trainer's torch AdamW, or DeepSpeedCPUAdam under optimizer offload. The moments of the parameters in `held`
    (`hold_scalars_as_vectors`) are 0-dim, as one process's."""
    from deepspeed.utils import safe_get_full_optimizer_state

    stepping = zero_optimizer.optimizer
    step = _step_count(stepping)
    if step is not None:
        _link_state(zero_optimizer)
    state, param_groups, index = {}, [], 0
    for (parameters, names), current in zip(groups, stepping.param_groups):
        param_groups.append({**{key: current[key] for key in names},
                             "params": list(range(index, index + len(parameters)))})
        for parameter in parameters:
            if step is not None:
                moments = {key: safe_get_full_optimizer_state(parameter, key).cpu() for key in MOMENTS}
                if id(parameter) in held:
                    moments = {key: value.reshape(()) for key, value in moments.items()}
                state[index] = {"step": step.clone(), **moments}
            index += 1
    return {"state": state, "param_groups": param_groups}


def load_full_optimizer_state(groups: Groups, zero_optimizer, state: dict) -> None:
    """Inverse of `full_optimizer_state`, after DeepSpeed has partitioned model and optimizer (every process passes
    the same full state). Adam creates its state at the first step, so it is created here first, zero, for DeepSpeed
    to copy each parameter's slice into."""
    stepping = zero_optimizer.optimizer
    for group, saved in zip(stepping.param_groups, state["param_groups"]):
        group.update({key: tuple(value) if key == "betas" else value for key, value in saved.items()
                      if key in group and key != "params"})
    if not state["state"]:
        return
    step = next(iter(state["state"].values()))["step"]
    torch_adam = isinstance(stepping, (torch.optim.Adam, torch.optim.AdamW))
    on_device = stepping.defaults.get("fused") or stepping.defaults.get("capturable")  # where AdamW keeps the count
    for flat in _flat_partitions(zero_optimizer):
        count = step.to(torch.float32, copy=True).to(flat.device if on_device else "cpu") if torch_adam \
            else int(step.item())
        stepping.state[flat] = {"step": count, **{key: torch.zeros_like(flat) for key in MOMENTS}}
    _link_state(zero_optimizer)
    index = 0
    for parameters, _ in groups:
        for parameter in parameters:
            for key, value in state["state"].get(index, {}).items():  # a parameter one process never stepped: zero
                if key in MOMENTS:
                    _set_full(parameter, value.to(parameter.device), key)
            index += 1


def full_fp32_weights(groups: Groups, module: nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 master weight of every trained parameter of `module` (the engine's), by every name it has (tied
    ones too), on every process in CPU memory; collective. Under bf16 / fp16 the module's own parameters are rounded
    copies: a checkpoint of those would lose the master's low bits at every resume."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = {id(parameter): safe_get_full_fp32_param(parameter).cpu() for parameters, _ in groups
              for parameter in parameters}
    return {name: master[id(parameter)] for name, parameter in module.named_parameters(remove_duplicate=False)
            if id(parameter) in master}


def trained_values(groups: Groups) -> list[torch.Tensor]:
    """A copy of each trained parameter's value, in optimizer order, taken before DeepSpeed partitions and casts
    them (`load_fp32_weights` gives them back to the fp32 master)."""
    return [parameter.detach().float().clone() for parameters, _ in groups for parameter in parameters]


def load_fp32_weights(groups: Groups, values: list[torch.Tensor]) -> None:
    """Set DeepSpeed's fp32 master weights to `values` (from `trained_values`), after it built them from the
    module's (under bf16 / fp16, rounded) parameters."""
    parameters = [parameter for group, _ in groups for parameter in group]
    for parameter, value in zip(parameters, values):
        _set_full(parameter, value.to(parameter.device))


def _set_full(parameter: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """`safe_set_full_fp32_param` (key None) / `safe_set_full_optimizer_state`: this process's slice of the full
    `value` into the fp32 master (or Adam state `key`) of `parameter`. Under ZeRO-3 DeepSpeed 0.19's setter narrows
    the value past its end on the last process when the parameter's size does not divide by the process count (its
    partitions are padded; a scalar held as (1,) always is), so the slice is taken here, through ZeRO-3's private
    `_get_fp32_opt_state_partition` and `_get_param_partition_rank` (no NVMe swapping: no shipped config uses it)."""
    if not hasattr(parameter, "ds_id"):  # ZeRO 1-2: DeepSpeed's setter addresses each fragment within the parameter
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if key is None:
            safe_set_full_fp32_param(parameter, value)
        else:
            safe_set_full_optimizer_state(parameter, value, key)
        return
    zero_optimizer = parameter._z3_optimizer
    partition, _ = zero_optimizer._get_fp32_opt_state_partition(parameter, release_swap_buffers=False,
                                                                optim_state_key=key)
    start = partition.numel() * zero_optimizer._get_param_partition_rank(parameter)
    piece = value.flatten()[start:start + partition.numel()]  # shorter, or empty, where the partition is padding
    partition.data[:piece.numel()].copy_(piece)
