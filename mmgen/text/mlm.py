"""A bidirectional (BERT-style) masked language model on the mmgen.nn blocks, and its training objective.

The encoder is the GPT's transformer without the causal mask: every token sees the whole sequence (padding keys
excepted). BERT's layout (post-norm blocks, an embedding LayerNorm, segment embeddings) is a config choice, so
transformers' BertForMaskedLM and DistilBertForMaskedLM load into it (mmgen.text.hf_bert).

The objective is BERT's (Devlin et al. 2019): 15% of the tokens are chosen; of those 80% become [MASK], 10% a
random token and 10% stay as they are; the loss is the cross-entropy on the chosen tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from ..hub import PretrainedMixin
from ..nn import LearnedPositions, Transformer
from ..nn.norms import make_norm

IGNORE_INDEX = -100  # a target that is not predicted (a token that was not chosen)


@dataclass
class MLMConfig:
    """Shape of a masked LM; `vocab_size` is normally filled in from the tokenizer."""

    vocab_size: int = 66
    context_length: int = 128
    num_layers: int = 4
    num_heads: int = 4
    dim: int = 128
    mlp_ratio: float = 4.0
    mlp: Literal["gelu", "gelu_tanh"] = "gelu"
    norm_position: Literal["pre", "post"] = "pre"  # post: BERT's (embedding LayerNorm, no final norm)
    norm_eps: float = 1e-5  # BERT: 1e-12
    type_vocab_size: int = 0  # BERT's segment (token type) embeddings: 2; 0: none (DistilBERT)
    bias: bool = True
    dropout: float = 0.0
    tie_weights: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "num_layers", "num_heads", "dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.norm_eps < 1.0:
            raise ValueError(f"norm_eps must lie in (0, 1), got {self.norm_eps}")


class MaskedLM(nn.Module, PretrainedMixin):
    """Token (+ segment) + position embeddings -> bidirectional transformer -> BERT's prediction head -> logits."""

    model_type = "mlm"
    config_class = MLMConfig

    def __init__(self, config: MLMConfig):
        super().__init__()
        self.config = config
        post = config.norm_position == "post"
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.position_embedding = LearnedPositions(config.context_length, config.dim)
        self.token_type_embedding = nn.Embedding(config.type_vocab_size, config.dim) if config.type_vocab_size else None
        self.embedding_norm = make_norm("layernorm", config.dim, config.norm_eps, config.bias) if post else None
        self.dropout = nn.Dropout(config.dropout)
        self.transformer = Transformer(config.num_layers, config.dim, config.num_heads, mlp_ratio=config.mlp_ratio,
                                       mlp=config.mlp, norm_eps=config.norm_eps, bias=config.bias,
                                       dropout=config.dropout, norm_position=config.norm_position)
        self.norm = None if post else make_norm("layernorm", config.dim, config.norm_eps, config.bias)
        # BERT's prediction head: dense -> activation -> LayerNorm -> vocabulary projection (with a bias)
        self.head_transform = nn.Linear(config.dim, config.dim)
        self.head_norm = make_norm("layernorm", config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size)
        self.apply(_init_weights)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        if config.tie_weights:
            self.lm_head.weight = self.token_embedding.weight

    def encode(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None,
               token_types: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (batch, seq, dim) of tokens (batch, seq); padding_mask: bool, True marks padding."""
        if tokens.shape[1] > self.config.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context length {self.config.context_length}")
        x = self.token_embedding(tokens) + self.position_embedding(tokens.shape[1])
        if self.token_type_embedding is not None:
            x = x + self.token_type_embedding(torch.zeros_like(tokens) if token_types is None else token_types)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        x = self.transformer(self.dropout(x), key_padding_mask=padding_mask)
        return x if self.norm is None else self.norm(x)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None,
                token_types: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) of the token at every position."""
        hidden = self.head_transform(self.encode(tokens, padding_mask, token_types))
        hidden = F.gelu(hidden, approximate="tanh" if self.config.mlp == "gelu_tanh" else "none")
        return self.lm_head(self.head_norm(hidden))

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


@dataclass
class MaskingConfig:
    """BERT's corruption: `probability` of the tokens are chosen; of those `mask_fraction` become [MASK],
    `random_fraction` a random token, and the rest stay as they are."""

    probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.probability <= 1.0:
            raise ValueError(f"probability must lie in (0, 1], got {self.probability}")
        if not (0.0 <= self.mask_fraction and 0.0 <= self.random_fraction
                and self.mask_fraction + self.random_fraction <= 1.0):
            raise ValueError("mask_fraction and random_fraction must be >= 0 and add up to at most 1, got "
                             f"{self.mask_fraction} and {self.random_fraction}")


def mask_tokens(tokens: torch.Tensor, mask_token_id: int, replacement_ids: torch.Tensor,
                masking: MaskingConfig = MaskingConfig(), maskable: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for tokens (batch, seq): inputs corrupted as BERT does, targets the original token at
    the chosen positions and IGNORE_INDEX elsewhere.

    replacement_ids: the ids a random replacement is drawn from (the vocabulary without special tokens);
    maskable: bool (batch, seq), the positions that may be chosen (not padding); None: all."""
    options = dict(device=tokens.device, generator=generator)
    chosen = torch.rand(tokens.shape, **options) < masking.probability
    if maskable is not None:
        chosen &= maskable
    kind = torch.rand(tokens.shape, **options)  # < mask_fraction: [MASK]; then random_fraction: random; else kept
    to_mask = chosen & (kind < masking.mask_fraction)
    to_random = chosen & (kind >= masking.mask_fraction) & (kind < masking.mask_fraction + masking.random_fraction)
    replacement_ids = replacement_ids.to(tokens.device)
    random_tokens = replacement_ids[torch.randint(len(replacement_ids), tokens.shape, **options)]
    inputs = torch.where(to_mask, mask_token_id, torch.where(to_random, random_tokens, tokens))
    targets = torch.where(chosen, tokens, IGNORE_INDEX)
    return inputs, targets


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy) over the chosen positions (targets != IGNORE_INDEX); 0 and 0 when none is."""
    chosen = targets != IGNORE_INDEX
    count = chosen.sum().clamp(min=1)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / count
    correct = ((logits.argmax(dim=-1) == targets) & chosen).sum()
    return loss, correct.float() / count


class MaskedLMObjective:
    """loss_fn of the MLM recipe: mask a batch of token windows (batch, seq) and score the chosen tokens."""

    def __init__(self, mask_token_id: int, replacement_ids: torch.Tensor, masking: MaskingConfig = MaskingConfig()):
        self.mask_token_id, self.replacement_ids, self.masking = mask_token_id, replacement_ids, masking

    def __call__(self, model, batch: torch.Tensor, generator: torch.Generator | None = None):
        inputs, targets = mask_tokens(batch, self.mask_token_id, self.replacement_ids, self.masking,
                                      generator=generator)
        loss, accuracy = masked_lm_loss(model(inputs), targets)
        return loss, {"train/masked_accuracy": accuracy.item()}


class HeldOutMaskedAccuracy:
    """evaluate_fn: masked-token accuracy on fixed held-out windows with a fixed masking, beside the unigram
    baseline's (always predicting the most frequent training token) on the same chosen positions."""

    def __init__(self, windows: torch.Tensor, objective: MaskedLMObjective, most_frequent_id: int,
                 batch_size: int = 64, seed: int = 0):
        self.windows, self.objective, self.most_frequent_id = windows, objective, most_frequent_id
        self.batch_size, self.seed = batch_size, seed

    @torch.no_grad()
    def __call__(self, model, step: int | None = None) -> dict:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        correct = baseline = chosen = 0
        for start in range(0, len(self.windows), self.batch_size):
            batch = self.windows[start : start + self.batch_size]
            inputs, targets = mask_tokens(batch, self.objective.mask_token_id, self.objective.replacement_ids,
                                          self.objective.masking, generator=generator)
            predictions = model(inputs.to(device)).argmax(dim=-1).cpu()
            is_chosen = targets != IGNORE_INDEX
            correct += ((predictions == targets) & is_chosen).sum().item()
            baseline += ((targets == self.most_frequent_id) & is_chosen).sum().item()
            chosen += is_chosen.sum().item()
        model.train(was_training)
        chosen = max(chosen, 1)
        return {"val/masked_accuracy": correct / chosen, "val/unigram_accuracy": baseline / chosen}
