"""Diffusion timestep embeddings: sinusoidal features and the MLP that turns them into a conditioning vector."""

import math

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (batch, dim) of timesteps t (batch,), cosines first, frequencies 1 .. 1/max_period.

    Equals diffusers' get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0).
    """
    t = torch.as_tensor(t).reshape(-1)
    half = dim // 2
    # same operation order as diffusers: angles reach ~1000 rad, where one rounding difference shows
    exponents = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponents)[None, :]  # (batch, half)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, dim % 2))  # an odd width gets one zero column


class TimestepEmbedding(nn.Module):
    """Timesteps (batch,) -> sinusoidal features of width `dim` -> Linear-SiLU-Linear -> (batch, hidden)."""

    def __init__(self, dim: int, hidden: int, max_period: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.max_period = max_period
        self.fc_in = nn.Linear(dim, hidden)
        self.fc_out = nn.Linear(hidden, hidden)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.dim, self.max_period).to(self.fc_in.weight.dtype)
        return self.fc_out(F.silu(self.fc_in(features)))
