"""An mmgen LoRA adapter of a latent text-to-image model -> the LoRA folder diffusers' `load_lora_weights` reads.

`StableDiffusionPipeline.load_lora_weights(DIR)` on the pipeline of the adapter's base (the SD folder it was converted
from, or `mmgen export stable-diffusion` of it) then computes what mmgen's merged model computes. DIR holds
pytorch_lora_weights.safetensors: peft's lora_A / lora_B matrices under diffusers' module names prefixed "unet."
(mmgen adapts the UNet only), with the LoraConfig diffusers stores as the file's adapter metadata.

The names come from the map `to_stable_diffusion` converts the weights with (unet_interop.diffusers_module_names).
Where mmgen fuses layers diffusers keeps apart (self-attention's q/k/v, cross-attention's k/v), the update B @ A is
split by rows: each diffusers layer gets its rows of B and the shared A, so B_q @ A, B_k @ A, B_v @ A are exactly
the rows of the fused update. The scale alpha / rank is folded into B and the metadata says alpha = rank: a loader
then applies the trained update exactly whether it reads the metadata (diffusers does) or, finding no alpha, takes
alpha = rank (diffusers' rule for a file without metadata).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import from_dict
from ..errors import CheckpointError, ConfigError, UserError
from ..io import atomic_folder, load_tensors
from .adapter import ADAPTER_WEIGHTS, read_adapter_config, resolve_adapter_folder
from .lora import ADAPTED_PART
from .peft_export import exportable_lora_config

DIFFUSERS_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file load_lora_weights(DIR) looks for
_UNET = ADAPTED_PART["text2img"] + "."


def export_diffusers_lora(adapter: str | Path, out_dir: str | Path) -> Path:
    """Write the adapter in `adapter` (a folder, or an adapter run's final/ or latest checkpoint) as a diffusers LoRA
    folder in `out_dir`, atomically. UserError for a qlora adapter, another model type than a latent text2img one,
    or a base whose layout SD's pipeline cannot express."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    folder = resolve_adapter_folder(adapter)
    meta = read_adapter_config(folder)
    config = exportable_lora_config(folder, meta)
    unet_config = _base_unet_config(folder, meta)
    state = diffusers_lora_state(load_tensors(folder / ADAPTER_WEIGHTS), unet_config, config.alpha / config.rank)
    targets = sorted({name.split(".lora_")[0] for name in state})
    metadata = LoraConfig(r=config.rank, lora_alpha=config.rank, lora_dropout=config.dropout, bias="none",
                          target_modules=targets).to_dict()
    with atomic_folder(out_dir) as staging:
        StableDiffusionPipeline.save_lora_weights(str(staging), unet_lora_layers=state,
                                                  unet_lora_adapter_metadata=metadata,
                                                  weight_name=DIFFUSERS_LORA_WEIGHTS)
    return Path(out_dir)


def diffusers_lora_state(tensors: dict[str, torch.Tensor], unet_config, scale: float) -> dict[str, torch.Tensor]:
    """mmgen's adapter tensors ("unet.<module>.lora_A.weight", ...) -> diffusers' UNet LoRA tensors
    ("<diffusers module>.lora_A.weight", ..., without the "unet." prefix save_lora_weights adds), B times `scale`.
    A fused module's B is split by rows among the diffusers modules, its A shared; shapes take diffusers' layer type."""
    from diffusers import UNet2DConditionModel

    from ..diffusion.unet_interop import diffusers_module_names, diffusers_modules_of, unet_config_to_diffusers

    names = diffusers_module_names(unet_config)
    with torch.device("meta"):
        their_weights = {name: tensor.shape for name, tensor in
                         UNet2DConditionModel(**unet_config_to_diffusers(unet_config)).state_dict().items()}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, leaf = key.partition(".lora_")
        if not module.startswith(_UNET) or leaf not in ("A.weight", "B.weight"):
            raise UserError(f"the adapter holds {key}: only LoRA matrices of the UNet export to diffusers")
        modules.setdefault(module.removeprefix(_UNET), {})[leaf[0]] = tensor
    state = {}
    for module, pair in modules.items():
        if module not in names or set(pair) != {"A", "B"}:
            raise UserError(f"the adapter's layer unet.{module} has no diffusers counterpart with lora_A and lora_B")
        theirs = diffusers_modules_of(names, module)
        for their, rows in zip(theirs, pair["B"].chunk(len(theirs), dim=0)):  # (out, rank[, 1, 1]) each
            shape = their_weights[f"{their}.weight"]  # Linear (out, in) or Conv2d (out, in, kh, kw)
            rank = pair["A"].shape[0]
            state[f"{their}.lora_A.weight"] = pair["A"].reshape(rank, *shape[1:]).clone()  # no shared storage
            state[f"{their}.lora_B.weight"] = (rows * scale).reshape(shape[0], rank, *[1] * (len(shape) - 2))
    return state


def _base_unet_config(folder: Path, meta: dict):
    """The UNetConfig of the adapter's base, after checking SD's pipeline can express the base (UserError if not)."""
    from ..diffusion.stable_diffusion import export_problems
    from ..diffusion.text2img import TextToImageConfig
    from ..diffusion.unet_interop import unet_config_to_diffusers

    if meta["model_type"] != "text2img":
        raise UserError(f"{folder} adapts a {meta['model_type']} model: only text2img adapters export to diffusers")
    if not isinstance(meta.get("base_config"), dict):
        raise CheckpointError(f"{folder}: its adapter config records no base config")
    try:
        config = from_dict(TextToImageConfig, meta["base_config"], "base_config.")
    except (ConfigError, ValueError) as error:
        raise CheckpointError(f"{folder}: its base config does not read back ({error})") from None
    problems = export_problems(config)
    if problems:
        raise UserError(f"{folder} adapts a model Stable Diffusion's pipeline cannot express: " + "; ".join(problems))
    unet_config_to_diffusers(config.unet)  # a UserError naming what diffusers' UNet lacks
    return config.unet
