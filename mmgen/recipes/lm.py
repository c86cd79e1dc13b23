"""Language-model recipe: a corpus, a char or BPE tokenizer, a GPT, next-token cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch.nn import functional as F

from ..data.text import TokenWindows, read_corpus, stack_windows
from ..errors import ConfigError
from ..text.gpt import GPT, GPTConfig
from ..text.tokenizers import (
    TOKENIZER_FILE,
    BPETokenizer,
    CharTokenizer,
    load_tokenizer,
)
from ..training import TrainConfig
from ..training.trainer import default_save
from .common import RecipeRun


@dataclass
class LMDataConfig:
    """Where the text comes from and how it is tokenized."""

    path: str | None = None  # None: Tiny Shakespeare (../shared/data, the cache, or a download)
    tokenizer: Literal["char", "bpe"] = "char"
    vocab_size: int = 1024  # BPE only
    val_fraction: float = 0.1  # the last fraction of the text is held out

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.vocab_size < 257:
            raise ValueError(f"vocab_size must be > 256 (the byte alphabet), got {self.vocab_size}")


@dataclass
class LMRecipe:
    """configs/lm-*.yaml: model, data and train sections."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def refuse_vocabulary_override(overrides) -> None:
    """The vocabulary size is the tokenizer's: a model.vocab_size override is a ConfigError."""
    if any(item.split("=", 1)[0] == "model.vocab_size" for item in overrides):
        raise ConfigError("model.vocab_size is set by the tokenizer; use data.vocab_size for BPE")


def next_token_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting batch[:, 1:] from batch[:, :-1]."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def text_datasets(tokens: torch.Tensor, val_fraction: float, context: int) -> tuple[TokenWindows, TokenWindows]:
    """(train, val) windows of `context` + 1 tokens: the last `val_fraction` of the text is held out."""
    split = int(len(tokens) * (1 - val_fraction))
    return TokenWindows(tokens[:split], context), TokenWindows(tokens[split:], context)


def saver(tokenizer, save=default_save):
    """A Trainer save_fn: `save(model, folder)` (a model folder by default) plus the tokenizer.json beside it."""

    def save_with_tokenizer(model, folder: Path) -> None:
        save(model, folder)
        (folder / TOKENIZER_FILE).write_text(tokenizer.to_json())

    return save_with_tokenizer


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False):
    """Train a GPT as `mmgen train lm` does; returns (model, tokenizer)."""
    refuse_vocabulary_override(overrides)
    run = RecipeRun.open(LMRecipe, config_path, overrides, run_dir, resume)
    recipe = run.recipe
    text = read_corpus(recipe.data.path)
    if resume and (run.folder.final / TOKENIZER_FILE).exists():
        tokenizer = load_tokenizer(run.folder.final)
    elif recipe.data.tokenizer == "char":
        tokenizer = CharTokenizer.train(text)
    else:
        tokenizer = BPETokenizer.train(text, recipe.data.vocab_size)
    tokens = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    context = recipe.model.context_length
    train_set, val_set = text_datasets(tokens, recipe.data.val_fraction, context)
    recipe.model = replace(recipe.model, vocab_size=tokenizer.vocab_size)

    model = run.build_model(lambda: GPT(recipe.model))
    run.state.print(f"GPT: {model.num_parameters() / 1e6:.2f}M parameters, vocabulary {tokenizer.vocab_size}, "
                    f"{len(tokens):,} tokens ({len(train_set):,} train windows, {len(val_set):,} val)")
    model = run.fit(model, loss_fn=next_token_loss, train_dataset=train_set, val_dataset=val_set,
                    collate_fn=stack_windows, save_fn=saver(tokenizer), tokens_per_sample=context)
    return model, tokenizer
