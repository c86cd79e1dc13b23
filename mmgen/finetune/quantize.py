"""4-bit base weights for QLoRA: nn.Linear layers become frozen bitsandbytes Linear4bit (NF4 or FP4)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..errors import UserError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INSTALL_HINT = "qlora needs bitsandbytes: pip install 'mmgen[qlora]' (or pip install bitsandbytes)"


def require_bitsandbytes():
    """The bitsandbytes module, or a UserError saying how to install it."""
    try:
        import bitsandbytes
    except (ImportError, OSError, RuntimeError):
        raise UserError(INSTALL_HINT) from None
    return bitsandbytes


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit layer (not peft's LoRA wrapper around one); never imports bitsandbytes."""
    bnb = sys.modules.get("bitsandbytes")  # not imported yet: no 4-bit layer can exist
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def quantize_linears(
    model: nn.Module,
    names: list[str],
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "float32",
) -> None:
    """Replace the nn.Linear layers called `names` (dotted paths in `model`) by frozen 4-bit Linear4bit layers.

    double_quant also quantises the per-block scales (QLoRA's double quantisation); compute_dtype is the dtype
    the 4-bit weights are dequantised to for each matmul.
    """
    bnb = require_bitsandbytes()
    for name in names:
        parent, attribute = _parent(model, name)
        linear = getattr(parent, attribute)
        if not isinstance(linear, nn.Linear) or is_4bit(linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear to quantise")
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=COMPUTE_DTYPES[compute_dtype],
            compress_statistics=double_quant,
            quant_type=quant_type,
            device="meta",  # the weight is set below: no throw-away fp32 allocation
        )
        weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type,
            module=quantized,
        )
        quantized.weight = weight.to(linear.weight.device)  # moving an unquantised Params4bit quantises it
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        # bitsandbytes' bf16 CPU inference path (AVX512-BF16 machines) repacks the weight in place on the first
        # eval-mode forward, ignores compute_dtype, and breaks the next training step (bitsandbytes 0.50): off
        quantized.support_avx512bf16_for_cpu = False
        quantized.train(linear.training)
        setattr(parent, attribute, quantized)
    # peft wraps Linear4bit in its 4-bit LoRA layer only when the model says it is loaded in 4 bits
    model.is_loaded_in_4bit = True


def dequantize(layer: nn.Module) -> nn.Linear:
    """A plain nn.Linear holding the dequantised weight (and the bias) of a Linear4bit layer."""
    bnb = require_bitsandbytes()
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(torch.float32), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.data.to(torch.float32), requires_grad=False)
    return linear.train(layer.training)


def dequantize_all(model: nn.Module) -> None:
    """Replace every Linear4bit layer left in `model` by a plain nn.Linear."""
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            parent, attribute = _parent(model, name)
            setattr(parent, attribute, dequantize(module))
    if hasattr(model, "is_loaded_in_4bit"):
        del model.is_loaded_in_4bit


def quantized_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the 4-bit layers' weights take with their quantisation statistics, bytes as fp32) over `model`."""
    seen: set[int] = set()
    stored = as_fp32 = 0
    for module in model.modules():
        if not is_4bit(module):
            continue
        state = module.weight.quant_state
        tensors = [module.weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code]
        for tensor in tensors:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                stored += tensor.numel() * tensor.element_size()
        as_fp32 += state.shape.numel() * 4
    return stored, as_fp32


def logical_shape(parameter: torch.Tensor) -> torch.Size:
    """The shape a parameter has before quantisation (a packed 4-bit weight reports its original shape)."""
    state = getattr(parameter, "quant_state", None)
    return state.shape if state is not None else parameter.shape


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attribute = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attribute
