"""Attention against a written-out reference: softmax(q k^T / sqrt(d)) v with explicit masks."""

import math

import pytest
import torch

from mmgen.nn import KVCache, MultiHeadAttention, RotaryEmbedding


def reference_attention(layer: MultiHeadAttention, x, context=None, mask=None):
    """Attention computed by hand from the layer's weights; mask: bool (batch|1, 1, q, k), True = attend."""
    heads, head_dim = layer.num_heads, layer.head_dim
    if context is None:
        q, k, v = layer.qkv_proj(x).chunk(3, dim=-1)
    else:
        q = layer.q_proj(x)
        k, v = layer.kv_proj(context).chunk(2, dim=-1)

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ v
    return layer.out_proj(out.transpose(1, 2).flatten(2))


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return MultiHeadAttention(48, 4).eval()


def test_self_attention_matches_reference(layer):
    x = torch.randn(3, 7, 48)
    torch.testing.assert_close(layer(x), reference_attention(layer, x), atol=1e-5, rtol=1e-5)


def test_causal_mask(layer):
    x = torch.randn(2, 9, 48)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(layer(x, causal=True), reference_attention(layer, x, mask=causal), atol=1e-5, rtol=1e-5)
    # a later token must not change earlier outputs
    changed = x.clone()
    changed[:, -1] = torch.randn(2, 48)
    torch.testing.assert_close(layer(changed, causal=True)[:, :-1], layer(x, causal=True)[:, :-1])


def test_key_padding_mask(layer):
    x = torch.randn(2, 6, 48)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    expected = reference_attention(layer, x, mask=~padding[:, None, None, :])
    torch.testing.assert_close(layer(x, key_padding_mask=padding), expected, atol=1e-5, rtol=1e-5)
    # padded keys have no influence on the unpadded row's neighbours
    altered = x.clone()
    altered[1, 4:] = torch.randn(2, 48)
    out, out_altered = layer(x, key_padding_mask=padding), layer(altered, key_padding_mask=padding)
    torch.testing.assert_close(out[1, :4], out_altered[1, :4])


def test_causal_and_padding_combined(layer):
    x = torch.randn(2, 5, 48)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None] & ~padding[:, None, None, :]
    expected = reference_attention(layer, x, mask=mask)
    got = layer(x, causal=True, key_padding_mask=padding)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :3], expected[1, :3], atol=1e-5, rtol=1e-5)


def test_cross_attention_other_width():
    torch.manual_seed(1)
    layer = MultiHeadAttention(32, 4, context_dim=20).eval()
    x, context = torch.randn(2, 5, 32), torch.randn(2, 11, 20)
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[0, 8:] = True
    expected = reference_attention(layer, x, context, mask=~padding[:, None, None, :])
    torch.testing.assert_close(layer(x, context, key_padding_mask=padding), expected, atol=1e-5, rtol=1e-5)


def test_self_and_cross_layers_reject_the_wrong_input(layer):
    with pytest.raises(ValueError, match="self-attention"):
        layer(torch.randn(1, 3, 48), torch.randn(1, 2, 48))
    cross = MultiHeadAttention(48, 4, context_dim=8)
    with pytest.raises(ValueError, match="needs a context"):
        cross(torch.randn(1, 3, 48))


@pytest.mark.parametrize("use_rotary", [False, True])
def test_kv_cache_matches_full_causal_attention(layer, use_rotary):
    rotary = RotaryEmbedding(layer.head_dim) if use_rotary else None
    x = torch.randn(2, 10, 48)
    full = layer(x, causal=True, rotary=rotary)
    cache = KVCache()
    pieces = [layer(x[:, :4], causal=True, cache=cache, rotary=rotary)]  # a prompt of 4 ...
    pieces += [layer(x[:, i : i + 1], causal=True, cache=cache, rotary=rotary) for i in range(4, 7)]  # ... 3 single steps
    pieces.append(layer(x[:, 7:], causal=True, cache=cache, rotary=rotary))  # ... and a chunk of 3
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert len(cache) == 10


def test_rotary_matches_transformers_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(2)
    head_dim, seq = 16, 12
    q, k = torch.randn(2, 3, seq, head_dim), torch.randn(2, 3, seq, head_dim)
    rotary = RotaryEmbedding(head_dim, base=10000.0)
    inverse_frequency = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq).float(), inverse_frequency)
    embedding = torch.cat([angles, angles], dim=-1)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, embedding.cos()[None], embedding.sin()[None])
    got_q, got_k = rotary(q, k)
    torch.testing.assert_close(got_q, expected_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, expected_k, atol=1e-5, rtol=1e-5)
    # with an offset, positions continue from it
    offset_q, _ = rotary(q[:, :, 5:], k[:, :, 5:], offset=5)
    torch.testing.assert_close(offset_q, expected_q[:, :, 5:], atol=1e-5, rtol=1e-5)


def test_rotary_scores_depend_on_relative_position_only():
    rotary = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    scores = []
    for offset in (0, 3, 17):
        q_rotated, _ = rotary(q, q, offset=offset + 2)
        _, k_rotated = rotary(k, k, offset=offset)
        scores.append((q_rotated * k_rotated).sum())
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[0], scores[2], atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(3)
    layer = MultiHeadAttention(16, 2, dropout=0.5)
    x = torch.randn(2, 4, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
