"""What one training forward saves for its backward, measured on the meta device (shapes, no storage): the
activation memory of a micro-batch for any model, in seconds even for a 7B one.

Meta tensors skip two things a real accelerator run does, which this module puts back: CUDA autocast (it ignores meta
tensors), and the fused attention kernel (meta tensors get the math fallback that keeps the (seq x seq) matrix)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_TO_16_BITS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.scaled_dot_product_attention, torch.matmul,
               torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__}
_TO_FP32 = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.cross_entropy, F.mse_loss, F.normalize,
            torch.Tensor.softmax, torch.Tensor.log_softmax, torch.exp, torch.Tensor.exp}

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class AsOnAnAccelerator(TorchFunctionMode):
    """What a real training step does that meta tensors would not: CUDA autocast's casts when `dtype` is 16-bit
    (16-bit inputs for matmuls, convolutions and attention, fp32 for norms, softmax and losses; real autocast ignores
    meta tensors), and a fused attention kernel instead of the math fallback meta tensors get (it saves q, k, v, the
    output and the log-sum-exp, not the (seq x seq) attention matrix)."""

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype = dtype
        self.weight_copies: dict[int, torch.Tensor] = {}  # id -> the 16-bit copy of a parameter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = None
        if self.dtype is not None:
            target = self.dtype if func in _TO_16_BITS else torch.float32 if func in _TO_FP32 else None
        if target is not None:
            def cast(value):
                if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == target:
                    return value
                copy = value.to(target)
                if isinstance(value, torch.nn.Parameter):
                    self.weight_copies[id(copy)] = copy
                return copy
            args = tuple(cast(value) for value in args)
            kwargs = {name: cast(value) for name, value in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            return _fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **options):
    """scaled_dot_product_attention through the fused CPU kernel (it has a meta implementation and saves what the
    CUDA flash / memory-efficient kernels save)."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                      attn_mask=attn_mask, scale=scale)[0]


@dataclass
class ForwardProfile:
    """Bytes one forward of one micro-batch saves for its backward: activations and the 16-bit copies of weights
    that autocast makes (each in all and per transformer block), and the blocks' inputs (what gradient checkpointing
    keeps)."""

    saved: int = 0
    copies: int = 0
    blocks: list[int] = field(default_factory=list)
    block_copies: list[int] = field(default_factory=list)
    block_inputs: list[int] = field(default_factory=list)

    def activations(self, checkpointing: bool) -> int:
        """With checkpointing: what lies outside the blocks, every block's input, and one block recomputed."""
        if not checkpointing or not self.blocks:
            return self.saved
        return self.saved - sum(self.blocks) + sum(self.block_inputs) + max(self.blocks)

    def weight_copies(self, checkpointing: bool) -> int:
        if not checkpointing or not self.block_copies:
            return self.copies
        return self.copies - sum(self.block_copies) + max(self.block_copies)


def meta_forward(model: torch.nn.Module, batch, loss_fn: Callable, precision: str) -> ForwardProfile:
    """Run `loss_fn(model, batch)` on the meta device as on an accelerator in `precision`, counting the bytes saved
    for the backward (each storage once; parameters themselves are not counted)."""
    from .nn.block import TransformerBlock

    profile = ForwardProfile()
    parameters = {id(p) for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}  # id of a saved storage's base tensor -> the tensor (keeps the id unique)
    casts = AsOnAnAccelerator(_DTYPES[precision] if precision in ("bf16", "fp16") else None)

    def pack(tensor: torch.Tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(tensor) not in parameters and id(base) not in parameters and id(base) not in seen:
            seen[id(base)] = base
            if id(base) in casts.weight_copies:
                profile.copies += base.untyped_storage().nbytes()
            else:
                profile.saved += base.untyped_storage().nbytes()
        return tensor

    starts: dict[int, tuple[int, int]] = {}

    def before(module, args):
        starts[id(module)] = profile.saved, profile.copies
        profile.block_inputs.append(args[0].numel() * args[0].element_size() if args else 0)

    def after(module, args, output):
        saved, copies = starts.pop(id(module))
        profile.blocks.append(profile.saved - saved)
        profile.block_copies.append(profile.copies - copies)

    blocks = [module for module in model.modules() if isinstance(module, TransformerBlock)]
    hooks = [block.register_forward_pre_hook(before) for block in blocks]
    hooks += [block.register_forward_hook(after) for block in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), casts:
            loss_fn(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return profile

