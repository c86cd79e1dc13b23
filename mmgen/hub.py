"""`save_pretrained` / `from_pretrained` folders (config.json + model.safetensors) and `mmgen.load`."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import torch

from .config import from_dict, to_dict
from .errors import CheckpointError, ConfigError
from .io import atomic_folder, load_tensors, read_json, save_tensors, write_json
from .memory import check_fits
from .run_folder import EMA_WEIGHTS_FILE, RunFolder, check_format, version_record

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
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
    "mlm": "mmgen.text.mlm:MaskedLM",
    "text-classifier": "mmgen.text.classifier:TextClassifier",
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
        write_json(folder / CONFIG_NAME, {"model_type": self.model_type, "config": to_dict(self.config),
                                          **version_record()})
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
        check_fits(lambda: cls(config), str(folder / CONFIG_NAME), device=map_location)  # before allocating anything
        model = cls(config)
        load_weights(model, folder / WEIGHTS_NAME)
        if (folder / EMA_WEIGHTS_FILE).exists():
            load_weights(model, folder / EMA_WEIGHTS_FILE, partial=True)
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
    _warn_unusual_casts(path, state, expected)
    model.load_state_dict(state, strict=False)


# dtypes a checkpoint may hold for a model of another of them without a word: 16-bit checkpoints of a float32 model
_ORDINARY_CASTS = {torch.float32, torch.float16, torch.bfloat16}


def _warn_unusual_casts(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Warn once per file when tensors will be cast other than between float32 and 16-bit floats: float64 (silently
    rounded), integers such as int8 (quantized values without their scales) into float parameters, or the reverse."""
    casts: dict[tuple[torch.dtype, torch.dtype], list[str]] = {}
    for name, tensor in state.items():
        source, target = tensor.dtype, expected[name].dtype
        if source != target and not (source in _ORDINARY_CASTS and target in _ORDINARY_CASTS):
            casts.setdefault((source, target), []).append(name)
    if casts:
        described = "; ".join(f"{len(names)} {str(source).removeprefix('torch.')} tensor(s) cast to "
                              f"{str(target).removeprefix('torch.')} (e.g. {names[0]})"
                              for (source, target), names in casts.items())
        warnings.warn(f"{path}: {described}: not a weight format mmgen writes (float32, float16, bfloat16)",
                      stacklevel=3)


def read_model_config(folder: Path) -> dict:
    """config.json of a model folder, checked for a known model_type and a "config" object."""
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    meta = read_json(folder / CONFIG_NAME)
    check_format(meta, folder / CONFIG_NAME)
    model_type = meta.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise CheckpointError(f"{folder / CONFIG_NAME}: unknown model_type {model_type!r} (known: {', '.join(MODEL_TYPES)})")
    if not isinstance(meta.get("config"), dict):
        found = "none" if "config" not in meta else type(meta["config"]).__name__
        raise CheckpointError(f'{folder / CONFIG_NAME}: "config" must be an object of model settings, got {found}')
    return meta


def resolve_model_folder(path: str | Path) -> Path:
    """The model folder behind `path`: RUN_DIR/final, a model folder itself, or RUN_DIR's latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    run = RunFolder(path)
    if (run.final / CONFIG_NAME).exists():
        return run.final
    if (path / CONFIG_NAME).exists():
        return path
    latest = run.latest()
    if latest is not None and (latest / CONFIG_NAME).exists():
        return latest
    if any((folder / ADAPTER_CONFIG_NAME).exists() for folder in (path, run.final, latest) if folder is not None):
        raise CheckpointError(f"{path} holds a LoRA adapter, not a model: pass it as --adapter with its base as the "
                              "checkpoint, or merge the two with mmgen merge-lora")
    if latest is not None:
        return latest
    raise CheckpointError(f"{path} holds no mmgen model (no config.json, final/ or checkpoints/step-N/)")


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

