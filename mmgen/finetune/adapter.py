"""Adapter folders: only the LoRA weights (adapter.safetensors) and adapter_config.json with a pointer to the base.

adapter_config.json records the LoRA config, the base's model_type, config and a fingerprint of its parameter
names and shapes, so an adapter put on another base is a clear CheckpointError rather than silent garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..config import from_dict, to_dict
from ..errors import CheckpointError, ConfigError
from ..hub import ADAPTER_CONFIG_NAME, CONFIG_NAME
from ..io import atomic_folder, load_tensors, read_json, save_tensors, write_json
from ..run_folder import RunFolder
from .lora import ADAPTER_NAME, LoRAConfig, add_lora, lora_state, model_type_of
from .quantize import logical_shape

ADAPTER_CONFIG = ADAPTER_CONFIG_NAME
ADAPTER_WEIGHTS = "adapter.safetensors"
FORMAT = "mmgen-lora/1"


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the base's parameter and buffer names and (unquantised) shapes; LoRA layers are ignored."""
    entries = []
    for kind, named in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, tensor in named:
            if ".lora_" in name:
                continue
            entries.append((kind, name.replace(".base_layer.", "."), list(logical_shape(tensor))))
    entries.sort()
    text = json.dumps([model_type_of(model), entries], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def save_adapter(model: nn.Module, folder: str | Path, base: str | None = None) -> Path:
    """Write the adapter of `model` (weights + adapter_config.json) into `folder`, atomically.

    base: the base model's path or identifier, recorded so the adapter can be loaded without naming it again.
    """
    with atomic_folder(folder) as staging:
        write_adapter(model, staging, base)
    return Path(folder)


def write_adapter(model: nn.Module, folder: str | Path, base: str | None = None) -> None:
    """Write the adapter files into an existing folder (not atomic on its own; usable as a Trainer save_fn)."""
    from peft import get_peft_model_state_dict

    state = lora_state(model)
    folder = Path(folder)
    meta = {
        "format": FORMAT,
        "model_type": model_type_of(model),
        "base": None if base is None else str(base),
        "base_fingerprint": base_fingerprint(model),
        "base_config": to_dict(model.config) if hasattr(model, "config") else None,
        "lora": to_dict(state.config),
        "layers": state.layers,
    }
    save_tensors(folder / ADAPTER_WEIGHTS, get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
    write_json(folder / ADAPTER_CONFIG, meta)


def resolve_adapter_folder(path: str | Path) -> Path:
    """The adapter folder behind `path`: the folder itself, RUN_DIR/final, or RUN_DIR's latest checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"adapter folder not found: {path}")
    run = RunFolder(path)
    for candidate in (path, run.final, run.latest()):
        if candidate is not None and (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    if (path / CONFIG_NAME).is_file() or (run.final / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} holds a full model, not an adapter (pass it as --checkpoint)")
    raise CheckpointError(f"{path} holds no adapter (no {ADAPTER_CONFIG} in it, its final/ or its checkpoints)")


def read_adapter_config(folder: str | Path) -> dict:
    """adapter_config.json of an adapter folder, checked for the keys load_adapter needs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder not found: {folder}")
    meta = read_json(folder / ADAPTER_CONFIG)
    missing = [key for key in ("model_type", "base_fingerprint", "lora", "layers") if key not in meta]
    if missing:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not an mmgen adapter (no {missing[0]!r})")
    return meta


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put the adapter in `folder` (or an adapter run's final/ or latest checkpoint) on `model`, in place; return it.

    `model` is the base, or a model already adapted with the same LoRA config (whose LoRA weights are replaced).
    The base is prepared as in training (a qlora adapter quantises it to 4 bits), so the result computes what was
    trained. Another model type, other base shapes or a different LoRA config are CheckpointErrors.
    """
    from peft import set_peft_model_state_dict

    folder = resolve_adapter_folder(folder)
    meta = read_adapter_config(folder)
    model_type = model_type_of(model)
    if meta["model_type"] != model_type:
        raise CheckpointError(f"{folder} is an adapter for a {meta['model_type']!r} model, not this {model_type!r} one")
    if meta["base_fingerprint"] != base_fingerprint(model):
        raise CheckpointError(f"{folder} was trained on another {model_type} base: {_difference(meta, model)}")
    try:
        config = from_dict(LoRAConfig, meta["lora"], "lora.")
    except ConfigError as error:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: {error}") from None
    if getattr(model, "lora_state", None) is None:
        add_lora(model, config)
    elif to_dict(lora_state(model).config) != to_dict(config):
        raise CheckpointError(f"{folder}: the model already carries a LoRA adapter with another config")
    if lora_state(model).layers != meta["layers"]:
        raise CheckpointError(f"{folder}: adapted layers differ from this model's ({ADAPTER_CONFIG} lists "
                              f"{len(meta['layers'])}, the config selects {len(lora_state(model).layers)})")
    tensors = load_tensors(folder / ADAPTER_WEIGHTS)
    _check_tensors(folder / ADAPTER_WEIGHTS, tensors, model)
    set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER_NAME)
    return model


def load_adapted(adapter: str | Path, base: str | Path | None = None, map_location: str | torch.device = "cpu"):
    """Load the base model (`base`, else the one recorded in the adapter) and put the adapter on it."""
    from ..hub import load

    adapter = resolve_adapter_folder(adapter)
    meta = read_adapter_config(adapter)
    base = base if base is not None else meta.get("base")
    if base is None:
        raise CheckpointError(f"{adapter} records no base model: name one (--base)")
    model = load(base, map_location=map_location)
    return load_adapter(model, adapter)


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    from peft import get_peft_model_state_dict

    expected = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
        raise CheckpointError(f"{path} does not match the adapter config ({detail})")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(expected[name].shape)}")


def _difference(meta: dict, model: nn.Module) -> str:
    """The first config key whose value differs between the adapter's base and `model`, for the error message."""
    saved, current = meta.get("base_config"), to_dict(model.config) if hasattr(model, "config") else None
    if isinstance(saved, dict) and isinstance(current, dict):
        for key, (old, new) in _flatten_pairs(saved, current):
            if old != new:
                return f"{key} is {old!r} in the adapter's base, {new!r} here"
    return "parameter names or shapes differ"


def _flatten_pairs(old: dict, new: dict, prefix: str = ""):
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _flatten_pairs(a, b, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", (a, b)
