"""Transformer block, norms, MLPs and gradient checkpointing."""

import pytest
import torch

from mmgen.nn import RMSNorm, SwiGLU, Transformer, TransformerBlock, make_mlp


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    norm = RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    reference = torch.nn.RMSNorm(24, eps=1e-6)
    reference.weight.data.copy_(norm.weight.data)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(norm(x), reference(x), atol=1e-5, rtol=1e-5)


def test_swiglu_formula():
    torch.manual_seed(1)
    layer = SwiGLU(8, 16)
    x = torch.randn(4, 8)
    expected = layer.fc_out(torch.nn.functional.silu(layer.fc_gate(x)) * layer.fc_in(x))
    torch.testing.assert_close(layer(x), expected)


def test_quick_gelu_and_unknown_mlp():
    mlp = make_mlp("quick_gelu", 4, 8)
    x = torch.randn(3, 4)
    hidden = mlp.fc_in(x)
    torch.testing.assert_close(mlp(x), mlp.fc_out(hidden * torch.sigmoid(1.702 * hidden)))
    with pytest.raises(ValueError, match="unknown mlp"):
        make_mlp("relu6", 4, 8)


@pytest.mark.parametrize("norm,mlp", [("layernorm", "gelu"), ("rmsnorm", "swiglu")])
def test_block_is_pre_norm_residual(norm, mlp):
    torch.manual_seed(2)
    block = TransformerBlock(32, 4, norm=norm, mlp=mlp).eval()
    x = torch.randn(2, 6, 32)
    h = x + block.attn(block.norm_attn(x), causal=True)
    expected = h + block.mlp(block.norm_mlp(h))
    torch.testing.assert_close(block(x, causal=True), expected)


def test_block_cross_attention_uses_context():
    torch.manual_seed(3)
    block = TransformerBlock(32, 4, context_dim=12).eval()
    x = torch.randn(2, 5, 32)
    a, b = block(x, context=torch.randn(2, 7, 12)), block(x, context=torch.randn(2, 7, 12))
    assert not torch.allclose(a, b)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(4)
    stack = Transformer(3, 32, 4, dropout=0.0)
    x = torch.randn(2, 8, 32, requires_grad=True)
    stack(x, causal=True).square().sum().backward()
    plain = [p.grad.clone() for p in stack.parameters()] + [x.grad.clone()]
    stack.zero_grad()
    x.grad = None
    stack.gradient_checkpointing = True
    stack.train()
    stack(x, causal=True).square().sum().backward()
    checkpointed = [p.grad for p in stack.parameters()] + [x.grad]
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("masks", ["none", "causal", "causal+padding", "padding"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_output_positions_equal_the_full_stack_at_those_positions(norm_position, masks, checkpointing):
    """A stack whose last block computes one position per row gives that row's full output, and the same gradients
    for every parameter and the input (the other positions still serve as keys and values)."""
    torch.manual_seed(2)
    stack = Transformer(3, 32, 4, mlp_ratio=2, norm_position=norm_position, gradient_checkpointing=checkpointing)
    x = torch.randn(5, 9, 32, requires_grad=True)
    positions = torch.tensor([0, 8, 3, 5, 1])
    options = {}
    if "causal" in masks:
        options["causal"] = True
    if "padding" in masks:
        options["key_padding_mask"] = torch.arange(9)[None, :] > positions[:, None] + 1
    full = stack(x, **options)[torch.arange(5), positions]
    loss_weights = torch.randn(5, 32)
    full_gradients = torch.autograd.grad((full * loss_weights).sum(), [x, *stack.parameters()])
    picked = stack(x, output_positions=positions, **options)
    assert picked.shape == (5, 32)
    torch.testing.assert_close(picked, full, atol=1e-5, rtol=1e-5)
    picked_gradients = torch.autograd.grad((picked * loss_weights).sum(), [x, *stack.parameters()])
    for expected, got in zip(full_gradients, picked_gradients):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    other = stack(x, output_positions=(positions + 1) % 9, **options)  # control: another position differs
    assert (other - full).abs().max() > 1e-2


def test_query_positions_refuse_what_they_cannot_express():
    from mmgen.nn import MultiHeadAttention

    attention = MultiHeadAttention(16, 2)
    x = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="query_positions"):
        attention(x, attn_mask=torch.ones(4, 4, dtype=torch.bool), query_positions=torch.tensor([0, 1]))
