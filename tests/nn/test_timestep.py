"""Sinusoidal timestep features and the timestep MLP, against diffusers."""

import pytest
import torch
from diffusers.models.embeddings import TimestepEmbedding as ReferenceTimestepEmbedding
from diffusers.models.embeddings import get_timestep_embedding

from mmgen.nn import TimestepEmbedding, timestep_embedding


@pytest.mark.parametrize("dim, max_period", [(32, 10000), (33, 10000), (64, 1000)])
def test_timestep_embedding_equals_diffusers(dim, max_period):
    t = torch.cat([torch.tensor([0, 1, 999]), torch.rand(5, generator=torch.Generator().manual_seed(0)) * 1000])
    expected = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=max_period)
    actual = timestep_embedding(t, dim, max_period=max_period)
    assert actual.shape == (8, dim)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_timestep_embedding_starts_with_cosines():
    features = timestep_embedding(torch.tensor([0.0, 7.0]), 8)
    torch.testing.assert_close(features[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos(0) = 1, sin(0) = 0
    torch.testing.assert_close(features[1, 0], torch.cos(torch.tensor(7.0)))  # the first frequency is 1


def test_timestep_mlp_equals_diffusers():
    torch.manual_seed(1)
    ours = TimestepEmbedding(16, 48)
    reference = ReferenceTimestepEmbedding(16, 48)
    reference.linear_1.load_state_dict(ours.fc_in.state_dict())
    reference.linear_2.load_state_dict(ours.fc_out.state_dict())
    t = torch.tensor([3, 250, 998])
    features = get_timestep_embedding(t, 16, flip_sin_to_cos=True, downscale_freq_shift=0)
    output = ours(t)
    assert output.shape == (3, 48)
    torch.testing.assert_close(output, reference(features))
