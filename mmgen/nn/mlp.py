"""Feed-forward layers of a transformer block: a GELU-family MLP, SwiGLU or GEGLU."""

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

MLPKind = Literal["gelu", "gelu_tanh", "quick_gelu", "swiglu", "geglu"]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation of OpenAI's CLIP weights."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "quick_gelu": quick_gelu,
}


class MLP(nn.Module):
    """Linear -> activation -> Linear -> dropout, hidden width `hidden_dim`."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc_out = nn.Linear(hidden_dim, dim, bias=bias)
        self.activation = _ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.activation(self.fc_in(x))))


class SwiGLU(nn.Module):
    """Gated MLP (Shazeer 2020): fc_out(silu(gate(x)) * fc_in(x))."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc_gate = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc_in = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc_out = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(F.silu(self.fc_gate(x)) * self.fc_in(x)))


class GEGLU(nn.Module):
    """GELU-gated MLP (Shazeer 2020), Stable Diffusion's feed-forward: fc_out(value * gelu(gate)), where value and
    gate are the two halves of one fc_in (dim -> 2 * hidden_dim), value first."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc_in = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.fc_out = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc_in(x).chunk(2, dim=-1)
        return self.dropout(self.fc_out(value * F.gelu(gate)))


def make_mlp(kind: MLPKind, dim: int, hidden_dim: int, bias: bool = True, dropout: float = 0.0) -> nn.Module:
    """The feed-forward layer named by `kind`."""
    if kind == "swiglu":
        return SwiGLU(dim, hidden_dim, bias=bias, dropout=dropout)
    if kind == "geglu":
        return GEGLU(dim, hidden_dim, bias=bias, dropout=dropout)
    if kind in _ACTIVATIONS:
        return MLP(dim, hidden_dim, activation=kind, bias=bias, dropout=dropout)
    raise ValueError(f"unknown mlp {kind!r} (expected one of gelu, gelu_tanh, quick_gelu, swiglu, geglu)")
