"""An mmgen LoRA adapter folder -> peft's own adapter folder (adapter_config.json + adapter_model.safetensors), which
`peft.PeftModel.from_pretrained(base, DIR)` puts on the same base: an mmgen model, under mmgen's module names.

mmgen's adapter weights already are peft's LoRA matrices (add_lora injects peft layers); the export renames them
to a PeftModel's keys and writes peft's LoraConfig for exactly the adapted layers. For diffusers'
`load_lora_weights` (the layers under diffusers' names) see diffusers_lora.py.
"""

from __future__ import annotations

from pathlib import Path

from ..config import from_dict
from ..errors import CheckpointError, ConfigError, UserError
from ..io import atomic_folder, load_tensors
from .adapter import ADAPTER_WEIGHTS, read_adapter_config, resolve_adapter_folder
from .lora import LoRAConfig

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # where a PeftModel keeps the model it wraps


def exportable_lora_config(folder: Path, meta: dict) -> LoRAConfig:
    """The LoRAConfig of the adapter in `folder` (`meta`: its adapter config), refused in one line unless it is a
    plain LoRA: a QLoRA adapter's matrices were trained on a 4-bit base."""
    try:
        config = from_dict(LoRAConfig, meta["lora"], "lora.")
    except ConfigError as error:
        raise CheckpointError(f"{folder}: {error}") from None
    if config.method != "lora":
        raise UserError(f"{folder} is a {config.method} adapter, trained on a 4-bit base: only lora adapters export")
    return config


def export_peft(adapter: str | Path, out_dir: str | Path) -> Path:
    """Write the adapter in `adapter` (a folder, or an adapter run's final/ or latest checkpoint) as a peft adapter
    folder in `out_dir`, atomically. A QLoRA adapter is refused: its matrices were trained on a 4-bit base."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder = resolve_adapter_folder(adapter)
    meta = read_adapter_config(folder)
    config = exportable_lora_config(folder, meta)
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
                             target_modules=sorted(meta["layers"]), base_model_name_or_path=meta.get("base"))
    tensors = load_tensors(folder / ADAPTER_WEIGHTS)
    with atomic_folder(out_dir) as staging:
        peft_config.save_pretrained(str(staging))
        save_file({PEFT_PREFIX + name: tensor.contiguous() for name, tensor in tensors.items()},
                  str(staging / PEFT_WEIGHTS), metadata={"format": "pt"})
    return Path(out_dir)
