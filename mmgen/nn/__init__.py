"""Shared building blocks: attention, transformer blocks, norms, MLPs, positions."""

from .attention import KVCache, MultiHeadAttention
from .block import Transformer, TransformerBlock
from .mlp import MLP, SwiGLU, make_mlp
from .norms import RMSNorm, make_norm
from .positions import LearnedPositions, RotaryEmbedding
from .timestep import TimestepEmbedding, timestep_embedding

__all__ = [
    "KVCache",
    "LearnedPositions",
    "MLP",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TimestepEmbedding",
    "Transformer",
    "TransformerBlock",
    "make_mlp",
    "make_norm",
    "timestep_embedding",
]
