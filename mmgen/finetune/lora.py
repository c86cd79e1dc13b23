"""LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023) on mmgen models, through peft.

LoRA freezes the base and learns, for each targeted weight W, a low-rank update (alpha / rank) * B @ A with B = 0
at the start, so an adapted model first computes exactly what its base computes. Targets are named after the
layers of the shared blocks (mmgen.nn.attention, mmgen.nn.mlp), found by module type, not by string accident.
QLoRA is the same on a base whose transformer-block Linear layers are frozen 4-bit weights (quantize.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..nn import TransformerBlock
from ..nn.attention import MultiHeadAttention
from ..nn.mlp import GEGLU, MLP, SwiGLU
from .quantize import COMPUTE_DTYPES, dequantize, dequantize_all, is_4bit, logical_shape, quantize_linears

TARGETS = {
    "qkv": "self-attention's fused query/key/value projection (qkv_proj)",
    "q": "cross-attention's query projection (q_proj)",
    "kv": "cross-attention's fused key/value projection (kv_proj)",
    "out": "attention output projections (out_proj)",
    "mlp_in": "MLP input projections (fc_in, and fc_gate of SwiGLU; GEGLU's fc_in holds value and gate)",
    "mlp_out": "MLP output projections (fc_out)",
    "conv": "every convolution of a UNet",
}
GROUPS = {"attn": ("qkv", "q", "kv", "out"), "mlp": ("mlp_in", "mlp_out")}
# model_type -> the submodule that is adapted; the rest (text2img's CLIP text encoder) stays frozen as it is
ADAPTED_PART = {"text2img": "unet"}
ADAPTER_NAME = "default"  # peft's name for the one adapter a model carries


@dataclass
class LoRAConfig:
    """The `lora:` section of a fine-tuning config: rank, alpha, dropout, targets; 4-bit options for qlora.

    targets: names from TARGETS, or the groups "attn" (every attention projection) and "mlp".
    """

    method: Literal["lora", "qlora"] = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn"])
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self):
        if self.method not in ("lora", "qlora"):
            raise ValueError(f"method must be 'lora' or 'qlora', got {self.method!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"targets must be a non-empty list of names, got {self.targets!r}")
        for target in self.targets:
            if target not in TARGETS and target not in GROUPS:
                known = ", ".join([*TARGETS, *GROUPS])
                raise ValueError(f"unknown LoRA target {target!r} (known: {known})")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")


@dataclass
class LoRAState:
    """What `add_lora` records on the model (as `model.lora_state`) for saving and merging."""

    config: LoRAConfig
    layers: list[str]  # dotted names of the adapted layers
    trainable_before: frozenset[str]  # parameters that required grad before the adapter was added


def model_type_of(model: nn.Module) -> str:
    """The model's registered type ("gpt", "clip", ...) or, for another module, its class name."""
    return getattr(model, "model_type", type(model).__name__)


def adapted_part(model: nn.Module) -> tuple[str, nn.Module]:
    """(name prefix, submodule) of the part of `model` that LoRA adapts: the UNet of a text2img model, else all."""
    attribute = ADAPTED_PART.get(model_type_of(model))
    return (f"{attribute}.", getattr(model, attribute)) if attribute else ("", model)


def layers_by_target(model: nn.Module) -> dict[str, list[str]]:
    """Every target name -> the dotted names of the layers of `model` it selects (possibly none)."""
    prefix, part = adapted_part(model)
    found: dict[str, list[str]] = {target: [] for target in TARGETS}
    is_unet = model_type_of(part) == "unet"
    for name, module in part.named_modules():
        path = f"{prefix}{name}."
        if isinstance(module, MultiHeadAttention):
            if module.is_cross_attention:
                found["q"].append(path + "q_proj")
                found["kv"].append(path + "kv_proj")
            else:
                found["qkv"].append(path + "qkv_proj")
            found["out"].append(path + "out_proj")
        elif isinstance(module, (MLP, SwiGLU, GEGLU)):
            if isinstance(module, SwiGLU):
                found["mlp_in"].append(path + "fc_gate")
            found["mlp_in"].append(path + "fc_in")
            found["mlp_out"].append(path + "fc_out")
        elif is_unet and isinstance(module, nn.Conv2d):
            found["conv"].append(prefix + name)
    return found


def target_layers(model: nn.Module, targets: list[str]) -> list[str]:
    """Dotted names of the layers `targets` select, in model order; a target that selects nothing is a ConfigError."""
    found = layers_by_target(model)
    present = [name for name in [*TARGETS, *GROUPS] if any(found[t] for t in GROUPS.get(name, (name,)))]
    selected: set[str] = set()
    for target in targets:
        if target not in TARGETS and target not in GROUPS:
            raise ConfigError(f"unknown LoRA target {target!r} (known: {', '.join([*TARGETS, *GROUPS])})")
        layers = [layer for member in GROUPS.get(target, (target,)) for layer in found[member]]
        if not layers:
            raise ConfigError(f"LoRA target {target!r} matches no layer of this {model_type_of(model)} model "
                              f"(targets it has: {', '.join(present)})")
        selected.update(layers)
    return [name for name, _ in model.named_modules() if name in selected]


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze `model` and add peft LoRA layers on the targeted layers (in place; the model keeps its class).

    With method "qlora" the Linear layers of the adapted part's transformer blocks (and any targeted Linear) first
    become frozen 4-bit Linear4bit layers. Only the LoRA matrices require grad afterwards.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if getattr(model, "lora_state", None) is not None:
        raise ConfigError("this model already has a LoRA adapter (merge it first, or start from the base)")
    layers = target_layers(model, config.targets)
    trainable_before = frozenset(name for name, parameter in model.named_parameters() if parameter.requires_grad)
    if config.method == "qlora":
        linears = set(_block_linears(model)) | {name for name in layers if type(model.get_submodule(name)) is nn.Linear}
        quantize_linears(model, [name for name, _ in model.named_modules() if name in linears],
                         quant_type=config.quant_type, double_quant=config.double_quant,
                         compute_dtype=config.compute_dtype)
    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        # a regex is matched against each module's full dotted name: exactly the resolved layers
        target_modules="(?:" + "|".join(re.escape(layer) for layer in layers) + ")",
        bias="none",
    )
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_is_lora_parameter(name))
    model.lora_state = LoRAState(config, layers, trainable_before)
    return model


def lora_state(model: nn.Module) -> LoRAState:
    """The LoRAState `add_lora` left on `model`; a ConfigError when the model has no adapter."""
    state = getattr(model, "lora_state", None)
    if state is None:
        raise ConfigError(f"this {model_type_of(model)} model has no LoRA adapter")
    return state


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts with its unquantised size, a tied matrix once."""
    trainable = total = 0
    for parameter in model.parameters():
        count = logical_shape(parameter).numel()
        total += count
        trainable += count if parameter.requires_grad else 0
    return trainable, total


def trainable_fraction(model: nn.Module) -> float:
    """Share of the model's parameters that require grad."""
    trainable, total = parameter_counts(model)
    return trainable / total


def summary(model: nn.Module) -> str:
    """One line: method, rank, adapted layers and the trainable-parameter fraction."""
    state = lora_state(model)
    trainable, total = parameter_counts(model)
    return (f"{state.config.method} rank {state.config.rank} on {len(state.layers)} layers: "
            f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)")


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the LoRA updates into the base weights and drop the adapter: a plain model (in place) for save_pretrained.

    4-bit layers become full-precision nn.Linear layers holding the dequantised weight plus the update.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = lora_state(model)
    lora_layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, layer in lora_layers:
        base = layer.get_base_layer()
        if is_4bit(base):
            merged = dequantize(base)
            with torch.no_grad():
                merged.weight += layer.get_delta_weight(ADAPTER_NAME).to(merged.weight.dtype)
        else:
            layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
            merged = base
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute, merged)
    dequantize_all(model)
    del model.peft_config, model.lora_state
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in state.trainable_before)
    return model


def _block_linears(model: nn.Module) -> list[str]:
    """Dotted names of the nn.Linear layers inside the adapted part's transformer blocks."""
    prefix, part = adapted_part(model)
    names = []
    for block_name, block in part.named_modules():
        if isinstance(block, TransformerBlock):
            names += [f"{prefix}{block_name}.{name}" for name, module in block.named_modules()
                      if type(module) is nn.Linear]
    return names


def _is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name
