"""Resumable training state as safetensors + JSON (no pickles): optimizer and RNG (file names and the step:
mmgen.run_folder)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io import load_tensors, read_json, save_tensors, write_json

OPTIMIZER_TENSORS = "optimizer.safetensors"


def optimizer_to_files(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Split an optimizer state_dict into tensors (safetensors) and the rest (JSON)."""
    optimizer_state_to_files(optimizer.state_dict(), folder)


def optimizer_state_to_files(state: dict, folder: Path) -> None:
    """`optimizer_to_files` of a state dict (one gathered from a sharded model, keyed by parameter index)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    save_tensors(folder / OPTIMIZER_TENSORS, tensors)
    write_json(folder / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def optimizer_from_files(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Inverse of `optimizer_to_files`."""
    state = optimizer_state_from_files(folder)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{folder}: optimizer state does not match the model ({error})") from None


def optimizer_state_from_files(folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> dict:
    """The state dict `optimizer_to_files` wrote (its tensors given as `tensors` when they were stored elsewhere)."""
    tensors = load_tensors(folder / OPTIMIZER_TENSORS) if tensors is None else tensors
    meta = read_json(folder / "optimizer.json")
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def rng_to_file(path: Path) -> None:
    """Save this process's torch RNG states (CPU and, when present, the current CUDA device)."""
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_tensors(path, tensors)


def rng_from_file(path: Path) -> None:
    """Restore RNG states saved by `rng_to_file`."""
    tensors = load_tensors(path)
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
