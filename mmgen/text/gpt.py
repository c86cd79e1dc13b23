"""A decoder-only GPT language model built from mmgen.nn blocks (nanoGPT's model, on shared parts)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..hub import PretrainedMixin
from ..nn import KVCache, LearnedPositions, RotaryEmbedding, Transformer
from ..nn.mlp import MLPKind
from ..nn.norms import NormKind, make_norm


@dataclass
class GPTConfig:
    """Shape of a GPT; `vocab_size` is normally filled in from the tokenizer."""

    vocab_size: int = 65
    context_length: int = 256
    num_layers: int = 6
    num_heads: int = 6
    dim: int = 384
    mlp_ratio: float = 4.0
    mlp: MLPKind = "gelu"
    norm: NormKind = "layernorm"
    positions: Literal["learned", "rotary"] = "learned"
    bias: bool = True
    dropout: float = 0.0
    tie_weights: bool = True
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "num_layers", "num_heads", "dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class GPT(nn.Module, PretrainedMixin):
    """Token + position embeddings -> causal transformer -> final norm -> logits over the vocabulary."""

    model_type = "gpt"
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        if config.positions == "learned":
            self.position_embedding = LearnedPositions(config.context_length, config.dim)
            self.rotary = None
        else:
            self.position_embedding = None
            self.rotary = RotaryEmbedding(config.dim // config.num_heads)
        self.dropout = nn.Dropout(config.dropout)
        self.transformer = Transformer(
            config.num_layers,
            config.dim,
            config.num_heads,
            mlp_ratio=config.mlp_ratio,
            mlp=config.mlp,
            norm=config.norm,
            bias=config.bias,
            dropout=config.dropout,
            gradient_checkpointing=config.gradient_checkpointing,
        )
        self.norm = make_norm(config.norm, config.dim, bias=config.bias)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_weights:
            # the input embedding doubles as the output projection (Press & Wolf 2017): fewer parameters, better LM
            self.lm_head.weight = self.token_embedding.weight
        self.apply(_init_weights)
        if self.position_embedding is not None:
            nn.init.normal_(self.position_embedding.weight, std=0.02)
        # GPT-2's scaled init: each residual branch's output projection is shrunk by 1/sqrt(2 * layers),
        # so the residual stream's variance does not grow with depth
        for name, parameter in self.named_parameters():
            if name.endswith(("attn.out_proj.weight", "mlp.fc_out.weight")):
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * config.num_layers))

    def forward(self, tokens: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) for tokens (batch, seq); with `caches`, tokens follow the cached ones."""
        return self.lm_head(self.hidden_states(tokens, caches))

    def hidden_states(self, tokens: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """The final-norm outputs (batch, seq, dim) that the logits are read from (what a classifier head reads)."""
        offset = len(caches[0]) if caches else 0
        if offset + tokens.shape[1] > self.config.context_length:
            raise ValueError(f"{offset + tokens.shape[1]} tokens exceed the context length {self.config.context_length}")
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(tokens.shape[1], offset)
        x = self.transformer(self.dropout(x), causal=True, caches=caches, rotary=self.rotary)
        return self.norm(x)

    def new_caches(self) -> list[KVCache]:
        """Empty KV caches for incremental decoding."""
        return self.transformer.new_caches()

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
