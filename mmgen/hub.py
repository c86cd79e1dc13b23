"""`save_pretrained` / `from_pretrained` folders (config.json + model.safetensors) and `mmgen.load`."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

from .config import from_dict, to_dict
from .errors import CheckpointError, ConfigError
from .io import atomic_folder, load_tensors, read_json, save_tensors, write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "ema.safetensors"  # in a training checkpoint: the EMA of the trainable weights (mmgen.training.ema)
ADAPTER_CONFIG_NAME = "adapter_config.json"  # a LoRA adapter folder (mmgen.finetune.adapter), not a model

# model_type in config.json -> "module:Class"; imported only when such a folder is loaded
MODEL_TYPES: dict[str, str] = {
    "gpt": "mmgen.text.gpt:GPT",
    "clip": "mmgen.clip.model:CLIP",
    "unet": "mmgen.diffusion.unet:UNet",
    "vae": "mmgen.diffusion.vae:VAE",
    "text2img": "mmgen.diffusion.text2img:TextToImage",
    "prior": "mmgen.diffusion.prior:DiffusionPrior",
    "decoder": "mmgen.diffusion.decoder:UnCLIPDecoder",
    "clip-classifier": "mmgen.clip.classifier:CLIPClassifier",
}


class PretrainedMixin:
    """Adds save_pretrained / from_pretrained to an nn.Module built from one config dataclass.

    The class sets `model_type` (the key in config.json) and `config_class`; the instance keeps `config`.
    """

    model_type: str
    config_class: type

    def save_pretrained(self, folder: str | Path, extra_files: dict[str, str] | None = None) -> Path:
        """Write config.json and model.safetensors into `folder`, atomically."""
        with atomic_folder(folder) as staging:
            self.write_pretrained(staging)
            for name, text in (extra_files or {}).items():
                (staging / name).write_text(text)
        return Path(folder)

    def write_pretrained(self, folder: Path) -> None:
        """Write config.json and model.safetensors into an existing folder (not atomic on its own)."""
        write_json(folder / CONFIG_NAME, {"model_type": self.model_type, "config": to_dict(self.config)})
        save_tensors(folder / WEIGHTS_NAME, _unshared_state_dict(self))

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str | torch.device = "cpu"):
        """Build the model from `folder` (config.json + model.safetensors), in eval mode.

        A training checkpoint (RUN_DIR/checkpoints/step-N) of a run with EMA also holds ema.safetensors: its averaged
        weights replace the trained ones, so the model is what final/ would have held had the run ended there."""
        folder = Path(folder)
        meta = read_model_config(folder)
        if meta["model_type"] != cls.model_type:
            raise CheckpointError(f"{folder} holds a {meta['model_type']!r} model, not {cls.model_type!r}")
        try:
            config = from_dict(cls.config_class, meta.get("config", {}), "config.")
        except ConfigError as error:
            raise CheckpointError(f"{folder / CONFIG_NAME}: {error}") from None
        model = cls(config)
        load_weights(model, folder / WEIGHTS_NAME)
        if (folder / EMA_WEIGHTS_NAME).exists():
            load_weights(model, folder / EMA_WEIGHTS_NAME, partial=True)
        return model.to(map_location).eval()


def _unshared_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of tied parameters (safetensors refuses shared storage)."""
    state, seen = {}, set()
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        state[name] = tensor
    return state


def load_weights(model: torch.nn.Module, path: Path, partial: bool = False) -> None:
    """Load a safetensors file into `model`, checking names and shapes (tied parameters may be absent; with
    `partial`, any may: the file then replaces only the tensors it holds)."""
    state = load_tensors(path)
    expected = model.state_dict()
    tied = set(expected) - set(_unshared_state_dict(model))
    missing = [] if partial else [name for name in expected if name not in state and name not in tied]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{path} does not match the model in config.json ({detail})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False)


def read_model_config(folder: Path) -> dict:
    """config.json of a model folder, checked for a known model_type."""
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    meta = read_json(folder / CONFIG_NAME)
    model_type = meta.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{folder / CONFIG_NAME}: unknown model_type {model_type!r} (known: {', '.join(MODEL_TYPES)})")
    return meta


def resolve_model_folder(path: str | Path) -> Path:
    """The model folder behind `path`: RUN_DIR/final, a model folder itself, or RUN_DIR's latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / "final" / CONFIG_NAME).exists():
        return path / "final"
    if (path / CONFIG_NAME).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is not None and (latest / CONFIG_NAME).exists():
        return latest
    if any((folder / ADAPTER_CONFIG_NAME).exists() for folder in (path, path / "final", latest) if folder is not None):
        raise CheckpointError(f"{path} holds a LoRA adapter, not a model: pass it as --adapter with its base as the "
                              "checkpoint, or merge the two with mmgen merge-lora")
    if latest is not None:
        return latest
    raise CheckpointError(f"{path} holds no mmgen model (no config.json, final/ or checkpoints/step-N/)")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """RUN_DIR/checkpoints/step-N with the largest N, or None."""
    folder = Path(run_dir) / "checkpoints"
    steps = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = re.fullmatch(r"step-(\d+)", child.name)
            if match and child.is_dir():
                steps.append((int(match.group(1)), child))
    return max(steps)[1] if steps else None


def model_class(model_type: str) -> type:
    """The class registered for `model_type`."""
    module_name, class_name = MODEL_TYPES[model_type].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_as(path: str | Path, cls: type, map_location: str | torch.device = "cpu"):
    """`load(path)` for a folder that must hold a `cls` model; another model type is a CheckpointError naming both."""
    folder = resolve_model_folder(path)
    model_type = read_model_config(folder)["model_type"]
    if model_type != cls.model_type:
        raise CheckpointError(f"{folder} holds a {model_type!r} model, not a {cls.model_type!r} one")
    return cls.from_pretrained(folder, map_location=map_location)


def load(path: str | Path, map_location: str | torch.device = "cpu"):
    """Load any mmgen model from a run folder (final/ or latest checkpoint) or a model folder."""
    folder = resolve_model_folder(path)
    meta = read_model_config(folder)
    return model_class(meta["model_type"]).from_pretrained(folder, map_location=map_location)

