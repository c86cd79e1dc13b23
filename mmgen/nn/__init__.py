"""Shared building blocks: attention, transformer blocks, norms, MLPs, positions."""

from .attention import KVCache, MultiHeadAttention
from .block import Transformer, TransformerBlock
from .mlp import MLP, SwiGLU, make_mlp
from .norms import RMSNorm, make_norm
from .positions import LearnedPositions, RotaryEmbedding

__all__ = [
    "KVCache",
    "LearnedPositions",
    "MLP",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "Transformer",
    "TransformerBlock",
    "make_mlp",
    "make_norm",
]
