"""Conversion between mmgen's VAE and diffusers' AutoencoderKL (same maths, other parameter names).

Supported: AutoencoderKL with DownEncoderBlock2D / UpDecoderBlock2D levels, SiLU, in_channels == out_channels,
block_out_channels that are multiples of the first, both 1x1 quant convs or neither, and no latents_mean /
latents_std: the VAEs of Stable Diffusion 1/2/XL, SD3 and FLUX.1. Refused with a UserError: anything else.
diffusers' force_upcast (half-precision advice) and sample_size (tiling) are not carried over.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError, UserError
from ..io import read_json
from .vae import VAE, VAEConfig

_RESIDUAL_NAMES = {  # ours -> diffusers', inside one residual block
    "norm_in": "norm1",
    "conv_in": "conv1",
    "norm_out": "norm2",
    "conv_out": "conv2",
    "skip": "conv_shortcut",  # present only where the block changes the width
}


def _module_names(config: VAEConfig) -> dict[str, str | tuple[str, str, str]]:
    """Our module name -> diffusers' for every module with parameters.

    Our fused attention projection maps to diffusers' three (to_q, to_k, to_v), whose rows it stacks in that order.
    """
    names: dict[str, str | tuple[str, str, str]] = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        names[f"{part}.conv_in"] = f"{part}.conv_in"
        names[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        names[f"{part}.conv_out"] = f"{part}.conv_out"
        attention = f"{part}.mid_block.attentions.0"
        names[f"{part}.mid.attention.norm"] = f"{attention}.group_norm"
        names[f"{part}.mid.attention.attn.qkv_proj"] = (f"{attention}.to_q", f"{attention}.to_k", f"{attention}.to_v")
        names[f"{part}.mid.attention.attn.out_proj"] = f"{attention}.to_out.0"
        residuals = {f"{part}.mid.residual_in": f"{part}.mid_block.resnets.0"}
        residuals[f"{part}.mid.residual_out"] = f"{part}.mid_block.resnets.1"
        if part == "encoder":
            their_levels, resampler, blocks = "down_blocks", "downsamplers", config.blocks_per_level
        else:  # both count the decoder's levels from the lowest resolution up
            their_levels, resampler, blocks = "up_blocks", "upsamplers", config.blocks_per_level + 1
        for level in range(len(config.channel_multipliers)):
            names[f"{part}.levels.{level}.resample.conv"] = f"{part}.{their_levels}.{level}.{resampler}.0.conv"
            for block in range(blocks):
                residuals[f"{part}.levels.{level}.blocks.{block}"] = f"{part}.{their_levels}.{level}.resnets.{block}"
        for ours, theirs in residuals.items():
            for our_leaf, their_leaf in _RESIDUAL_NAMES.items():
                names[f"{ours}.{our_leaf}"] = f"{theirs}.{their_leaf}"
    return names


def vae_config_from_diffusers(config: Mapping) -> VAEConfig:
    """The VAEConfig of a diffusers AutoencoderKL config (model.config or its config.json); UserError if unsupported.

    Keys an older config.json lacks take diffusers' defaults.
    """
    channels = list(config.get("block_out_channels", (64,)))
    levels = len(channels)
    down_types = list(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up_types = list(config.get("up_block_types", ("UpDecoderBlock2D",)))
    problems = []
    if down_types != ["DownEncoderBlock2D"] * levels:
        problems.append(f"down_block_types {down_types} (only {levels} x DownEncoderBlock2D)")
    if up_types != ["UpDecoderBlock2D"] * levels:
        problems.append(f"up_block_types {up_types} (only {levels} x UpDecoderBlock2D)")
    if config.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn {config['act_fn']!r} (only 'silu')")
    in_channels, out_channels = config.get("in_channels", 3), config.get("out_channels", 3)
    if in_channels != out_channels:
        problems.append(f"in_channels {in_channels} != out_channels {out_channels}")
    quant, post_quant = config.get("use_quant_conv", True), config.get("use_post_quant_conv", True)
    if quant != post_quant:
        problems.append(f"use_quant_conv {quant} with use_post_quant_conv {post_quant} (both or neither)")
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            problems.append(f"per-channel {key}")
    if not channels or any(width < 1 or width % channels[0] for width in channels):
        problems.append(f"block_out_channels {channels} (each must be a positive multiple of the first)")
    if problems:
        raise UserError("this diffusers AutoencoderKL cannot be converted to mmgen's VAE: " + "; ".join(problems))
    shift_factor = config.get("shift_factor")
    try:
        return VAEConfig(
            in_channels=in_channels,
            latent_channels=config.get("latent_channels", 4),
            base_channels=channels[0],
            channel_multipliers=tuple(width // channels[0] for width in channels),
            blocks_per_level=config.get("layers_per_block", 1),
            groups=config.get("norm_num_groups", 32),
            mid_attention=config.get("mid_block_add_attention", True),
            quant_convs=quant,
            scaling_factor=float(config.get("scaling_factor", 0.18215)),
            shift_factor=0.0 if shift_factor is None else float(shift_factor),
        )
    except ValueError as error:
        raise UserError(f"this diffusers AutoencoderKL cannot be converted to mmgen's VAE: {error}") from None


def from_diffusers_vae(model_or_folder) -> VAE:
    """An mmgen VAE (float32, on the CPU) with the weights of a diffusers AutoencoderKL, or of a local folder of one.

    A folder holds config.json + diffusion_pytorch_model.safetensors, or is a pipeline folder with such a vae/.
    """
    from diffusers import AutoencoderKL

    model = model_or_folder
    if isinstance(model_or_folder, (str, Path)):
        model = load_diffusers_vae(model_or_folder)
    if not isinstance(model, AutoencoderKL):
        raise UserError(f"expected a diffusers AutoencoderKL or its folder, got {type(model).__name__}")
    config = vae_config_from_diffusers(model.config)
    vae = VAE(config)
    their_state = model.state_dict()
    names = _module_names(config)
    state, used = {}, set()
    for name in vae.state_dict():
        module, leaf = name.rsplit(".", 1)
        theirs = names[module]
        their_names = [f"{part}.{leaf}" for part in theirs] if isinstance(theirs, tuple) else [f"{theirs}.{leaf}"]
        missing = [their_name for their_name in their_names if their_name not in their_state]
        if missing:
            raise UserError(f"this diffusers AutoencoderKL has no {missing[0]}, which mmgen's VAE needs")
        state[name] = torch.cat([their_state[their_name].float() for their_name in their_names])
        used.update(their_names)
    unused = sorted(set(their_state) - used)
    if unused:
        raise UserError(f"this diffusers AutoencoderKL has parameters mmgen's VAE lacks: {', '.join(unused[:3])}")
    vae.load_state_dict(state, strict=True)
    return vae.train(model.training)


def to_diffusers_vae(vae: VAE):
    """A diffusers AutoencoderKL computing the same posterior and reconstruction as `vae`, with its latent factors."""
    from diffusers import AutoencoderKL

    config = vae.config
    levels = len(config.channel_multipliers)
    model = AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        down_block_types=["DownEncoderBlock2D"] * levels,  # lists, as in the config.json of a saved model
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(config.widths),
        layers_per_block=config.blocks_per_level,
        act_fn="silu",
        latent_channels=config.latent_channels,
        norm_num_groups=config.groups,
        scaling_factor=config.scaling_factor,
        shift_factor=config.shift_factor or None,  # Stable Diffusion 1/2/XL configs write None for no shift
        use_quant_conv=config.quant_convs,
        use_post_quant_conv=config.quant_convs,
        mid_block_add_attention=config.mid_attention,
    )
    names = _module_names(config)
    state = {}
    for name, tensor in vae.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        theirs = names[module]
        if isinstance(theirs, tuple):  # the fused [queries; keys; values] rows, split in three
            for their_module, part in zip(theirs, tensor.chunk(3, dim=0)):
                state[f"{their_module}.{leaf}"] = part.clone()
        else:
            state[f"{theirs}.{leaf}"] = tensor.clone()
    model.load_state_dict(state, strict=True)
    return model.to(next(vae.parameters()).device).train(vae.training)


def load_diffusers_vae(folder: str | Path):
    """diffusers' AutoencoderKL from a local folder (no download); a pipeline folder's vae/ is found as well."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"diffusers VAE folder not found: {folder}")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a diffusers model folder (no config.json, nor vae/config.json)")
    meta = read_json(folder / "config.json")
    class_name = meta.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise UserError(f"{folder} holds a diffusers {class_name}, not an AutoencoderKL")
    vae_config_from_diffusers(meta)  # an unsupported architecture is refused before any weights are read
    try:
        return AutoencoderKL.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{folder}: cannot load it as diffusers' AutoencoderKL ({detail})") from None


def convert_diffusers_vae_folder(source: str | Path, out: str | Path) -> VAE:
    """Read a local diffusers AutoencoderKL folder and write an mmgen VAE folder (for `mmgen convert`)."""
    vae = from_diffusers_vae(source)
    vae.save_pretrained(out)
    return vae
