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
