"""Conversion between mmgen's UNet and diffusers' UNet2DConditionModel in Stable Diffusion 1.x / 2.x's layout.

Supported: CrossAttnDownBlock2D / DownBlock2D levels mirrored by CrossAttnUpBlock2D / UpBlock2D, the
UNetMidBlock2DCrossAttn middle, SiLU, sinusoidal timesteps (cosines first, no frequency shift), conditioning added to
the residual blocks' features ("default" time_embedding_norm), GEGLU feed-forwards, q/k/v without bias, heads per level
(SD's attention_head_dim counts heads), transformer depth per level, 1x1-conv or linear proj_in / proj_out (the same
linear map of the channels: the weights are reshaped), upcast_attention. Refused with a UserError: SDXL's added
conditions (addition_embed_type, class embeddings), ControlNets and other classes, other block types, and the rest.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import UserError
from .unet import UNet, UNetConfig

_RESIDUAL_NAMES = {  # ours -> diffusers', inside one residual block
    "norm_in": "norm1",
    "conv_in": "conv1",
    "embedding_proj": "time_emb_proj",
    "norm_out": "norm2",
    "conv_out": "conv2",
    "skip": "conv_shortcut",  # present only where the block changes the width
}
_BLOCK_NAMES = {  # ours -> diffusers', inside one transformer block; a tuple is stacked in that order
    "norm_attn": "norm1",
    "attn.qkv_proj": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.out_proj": "attn1.to_out.0",
    "norm_cross": "norm2",
    "cross_attn.q_proj": "attn2.to_q",
    "cross_attn.kv_proj": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.out_proj": "attn2.to_out.0",
    "norm_mlp": "norm3",
    "mlp.fc_in": "ff.net.0.proj",
    "mlp.fc_out": "ff.net.2",
}
# diffusers' defaults of what mmgen's UNet fixes: a config naming another value is refused
_FIXED = {
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "center_input_sample": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "attention_type": "default",
}
_ABSENT = ("addition_embed_type", "class_embed_type", "num_class_embeds", "encoder_hid_dim", "time_cond_proj_dim",
           "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act", "cross_attention_norm",
           "projection_class_embeddings_input_dim", "reverse_transformer_layers_per_block")


def _per_level(value, levels: int, name: str, problems: list) -> tuple[int, ...] | None:
    if isinstance(value, int):
        return (value,) * levels
    if isinstance(value, (list, tuple)) and len(value) == levels and all(isinstance(v, int) for v in value):
        return tuple(value)
    problems.append(f"{name} {value!r} (one integer, or one per level)")
    return None


def unet_config_from_diffusers(config: Mapping) -> UNetConfig:
    """The UNetConfig of a diffusers UNet2DConditionModel config (model.config or its config.json); UserError naming
    every part mmgen's UNet cannot express."""
    problems = []
    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    known_down = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    known_up = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
    if len(down) != levels or any(kind not in known_down for kind in down):
        problems.append(f"down_block_types {down} (only CrossAttnDownBlock2D / DownBlock2D, one per level)")
    elif [known_up.get(kind) for kind in reversed(up)] != [known_down[kind] for kind in down]:
        problems.append(f"up_block_types {up} (must mirror down_block_types with the Up blocks)")
    for key, expected in _FIXED.items():
        if key in config and config[key] != expected:
            problems.append(f"{key} {config[key]!r} (only {expected!r})")
    for key in _ABSENT:
        if config.get(key) is not None:
            problems.append(f"{key} {config[key]!r} (SDXL-style added conditioning is not supported)"
                            if key in ("addition_embed_type", "class_embed_type") else f"{key} {config[key]!r}")
    context_dim = config.get("cross_attention_dim", 1280)
    if not isinstance(context_dim, int):
        problems.append(f"cross_attention_dim {context_dim!r} (one width for every level)")
    blocks = config.get("layers_per_block", 2)
    if not isinstance(blocks, int):
        problems.append(f"layers_per_block {blocks!r} (one count for every level)")
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)  # SD's name counts heads
    heads = _per_level(heads, levels, "attention_head_dim", problems)
    depth = _per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block", problems)
    if not channels or any(width % channels[0] for width in channels):
        problems.append(f"block_out_channels {channels} (each must be a multiple of the first)")
    if problems:
        raise UserError("this diffusers UNet cannot be converted to mmgen's UNet: " + "; ".join(problems))
    try:
        return UNetConfig(
            in_channels=config.get("in_channels", 4),
            out_channels=config.get("out_channels", 4),
            base_channels=channels[0],
            channel_multipliers=tuple(width // channels[0] for width in channels),
            blocks_per_level=blocks,
            attention_levels=tuple(known_down[kind] for kind in down),
            context_dim=context_dim,
            groups=config.get("norm_num_groups", 32),
            scale_shift_norm=False,
            heads_per_level=heads,
            transformer_depth=None if set(depth) == {1} else depth,
            mlp="geglu",
            attention_qkv_bias=False,
            upcast_attention=bool(config.get("upcast_attention", False)),
            norm_eps=float(config.get("norm_eps", 1e-5)),
        )
    except ValueError as error:
        raise UserError(f"this diffusers UNet cannot be converted to mmgen's UNet: {error}") from None


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    """The UNet2DConditionModel arguments of a UNet computing what a `config` UNet computes; UserError naming every
    part diffusers' UNet cannot express."""
    problems = []
    if config.scale_shift_norm:
        problems.append("scale-shift (AdaGN) residual conditioning (needs scale_shift_norm: false)")
    if config.pooled_dim is not None:
        problems.append("a pooled text embedding added to the timestep embedding (needs pooled_dim: null)")
    if config.context_dim is None:
        problems.append("no cross-attention (needs a context_dim)")
    if config.mlp != "geglu":
        problems.append(f"the {config.mlp} feed-forward (needs mlp: geglu)")
    if config.attention_qkv_bias:
        problems.append("q/k/v projections with a bias (needs attention_qkv_bias: false)")
    if config.attention_norm_eps != 1e-6:
        problems.append(f"attention GroupNorm eps {config.attention_norm_eps} (needs 1e-6)")
    if config.patch_size != 1:
        problems.append(f"patch size {config.patch_size} (needs patch_size: 1)")
    if problems:
        raise UserError("this UNet cannot be expressed as diffusers' UNet2DConditionModel: " + "; ".join(problems))
    levels = range(len(config.channel_multipliers))
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels)],
        block_out_channels=[config.base_channels * m for m in config.channel_multipliers],
        layers_per_block=config.blocks_per_level,
        norm_num_groups=config.groups,
        norm_eps=config.norm_eps,
        cross_attention_dim=config.context_dim,
        attention_head_dim=[config.heads_at(level) for level in levels],
        transformer_layers_per_block=[config.depth_at(level) for level in levels],
        use_linear_projection=True,
        upcast_attention=config.upcast_attention,
    )


def _transformer_names(ours: str, theirs: str, depth: int) -> dict[str, str | tuple[str, ...]]:
    names: dict[str, str | tuple[str, ...]] = {f"{ours}.{part}": f"{theirs}.{part}"
                                               for part in ("norm", "proj_in", "proj_out")}
    for index in range(depth):
        block = f"{ours}.block" if index == 0 else f"{ours}.further_blocks.{index - 1}"
        for our_name, their_name in _BLOCK_NAMES.items():
            prefix = f"{theirs}.transformer_blocks.{index}."
            names[f"{block}.{our_name}"] = (tuple(prefix + part for part in their_name)
                                            if isinstance(their_name, tuple) else prefix + their_name)
    return names


def _stage_names(ours: str, their_block: str, index: int, config: UNetConfig, level: int, attends: bool) -> dict:
    names = {f"{ours}.residual.{a}": f"{their_block}.resnets.{index}.{b}" for a, b in _RESIDUAL_NAMES.items()}
    if attends:
        names.update(_transformer_names(f"{ours}.attention", f"{their_block}.attentions.{index}",
                                        config.depth_at(level)))
    return names


def diffusers_module_names(config: UNetConfig) -> dict[str, str | tuple[str, ...]]:
    """Our module name -> diffusers' for every module with parameters of a `config` UNet (a tuple: our module's output
    rows are those of the diffusers modules, stacked in that order: q/k/v, k/v). The one map of weights and LoRA."""
    names: dict[str, str | tuple[str, ...]] = {
        "time_embedding.fc_in": "time_embedding.linear_1",
        "time_embedding.fc_out": "time_embedding.linear_2",
        "conv_in": "conv_in",
        "norm_out": "conv_norm_out",
        "conv_out": "conv_out",
    }
    levels = len(config.channel_multipliers)
    for level in range(levels):
        for index in range(config.blocks_per_level):
            names.update(_stage_names(f"down_levels.{level}.stages.{index}", f"down_blocks.{level}", index, config,
                                      level, config.attention_levels[level]))
        names[f"down_levels.{level}.resample.conv"] = f"down_blocks.{level}.downsamplers.0.conv"
    names.update(_stage_names("mid_stage", "mid_block", 0, config, levels - 1, True))
    names.update({f"mid_residual.{a}": f"mid_block.resnets.1.{b}" for a, b in _RESIDUAL_NAMES.items()})
    for position, level in enumerate(reversed(range(levels))):  # both list the up path from the deepest level
        for index in range(config.blocks_per_level + 1):
            names.update(_stage_names(f"up_levels.{position}.stages.{index}", f"up_blocks.{position}", index, config,
                                      level, config.attention_levels[level]))
        names[f"up_levels.{position}.resample.conv"] = f"up_blocks.{position}.upsamplers.0.conv"
    return names


def diffusers_modules_of(names: dict, module: str) -> tuple[str, ...]:
    """The diffusers module(s) of our `module` in `names` (diffusers_module_names): one, or those its rows stack."""
    theirs = names[module]
    return (theirs,) if isinstance(theirs, str) else theirs


def _their_names(names: dict, parameter: str) -> list[str]:
    module, leaf = parameter.rsplit(".", 1)
    return [f"{part}.{leaf}" for part in diffusers_modules_of(names, module)]


def unet_state_from_diffusers(config: UNetConfig, their_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a `config` UNet from a diffusers UNet2DConditionModel's: views of their tensors where one
    maps to one (no copy), the stacked q/k/v rows otherwise. UserError for a missing or a superfluous parameter."""
    names = diffusers_module_names(config)
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in UNet(config).state_dict().items()}
    state, used = {}, set()
    for name, shape in shapes.items():
        their_names = _their_names(names, name)
        missing = [their for their in their_names if their not in their_state]
        if missing:
            raise UserError(f"this diffusers UNet has no {missing[0]}, which mmgen's UNet needs")
        parts = [their_state[their] for their in their_names]
        # a 1x1-conv proj_in / proj_out (SD 1) is the linear map of a linear one (SD 2): reshape either way
        state[name] = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(shape)
        used.update(their_names)
    unused = sorted(set(their_state) - used)
    if unused:
        raise UserError(f"this diffusers UNet has parameters mmgen's UNet lacks: {', '.join(unused[:3])}")
    return state


def from_diffusers_unet(model) -> UNet:
    """An mmgen UNet (float32, on the CPU) with the weights of a diffusers UNet2DConditionModel in SD's layout."""
    if type(model).__name__ != "UNet2DConditionModel":
        raise UserError(f"expected a diffusers UNet2DConditionModel, got {type(model).__name__}")
    config = unet_config_from_diffusers(model.config)
    unet = UNet(config)
    unet.load_state_dict(unet_state_from_diffusers(config, model.state_dict()), strict=True)  # copies, as float32
    return unet.train(model.training)


def to_diffusers_unet(unet: UNet):
    """A diffusers UNet2DConditionModel computing what `unet` computes (UserError for what it cannot express)."""
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**unet_config_to_diffusers(unet.config))
    their_shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    names = diffusers_module_names(unet.config)
    state = {}
    for name, tensor in unet.state_dict().items():
        their_names = _their_names(names, name)
        for their, part in zip(their_names, tensor.chunk(len(their_names), dim=0)):
            state[their] = part.reshape(their_shapes[their]).clone()
    model.load_state_dict(state, strict=True)
    return model.to(next(unet.parameters()).device).train(unet.training)
