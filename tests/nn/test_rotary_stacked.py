"""Rotary positions applied to queries and keys stacked in one tensor: bit for bit the textbook rotate-half."""

import torch

from mmgen.nn import MultiHeadAttention, RotaryEmbedding


def rotate_half_reference(x, offset):
    """x * cos + cat(-second, first) * sin, with the angles of positions offset.. (Su et al. 2021, GPT-NeoX layout)."""
    head_dim, length = x.shape[-1], x.shape[-2]
    inverse_frequency = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(offset, offset + length, dtype=torch.float32), inverse_frequency)
    angles = torch.cat([angles, angles], dim=-1)
    first, second = x.chunk(2, dim=-1)
    return x * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()


def test_stacked_rotation_is_bit_identical_to_rotate_half():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(16)
    qk = torch.randn(2, 3, 4, 9, 16)
    for offset in (0, 5):
        expected = rotate_half_reference(qk, offset)
        assert torch.equal(rotary.rotate(qk, offset), expected)
        q, k = rotary(qk[0], qk[1], offset=offset)
        assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])


def test_attention_with_rotary_equals_attention_on_rotated_heads():
    torch.manual_seed(1)
    layer = MultiHeadAttention(32, 4, bias=False).eval()
    x = torch.randn(2, 7, 32)
    q, k, v = layer.qkv_proj(x).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k = rotate_half_reference(q, 0), rotate_half_reference(k, 0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = layer.out_proj(out.transpose(1, 2).flatten(2))
    torch.testing.assert_close(layer(x, causal=True, rotary=RotaryEmbedding(8)), expected, rtol=0, atol=1e-6)
    x.requires_grad_(True)
    layer(x, causal=True, rotary=RotaryEmbedding(8)).sum().backward()  # the split's backward reaches the input
    assert x.grad is not None and x.grad.abs().sum() > 0
