"""Masked-LM recipe: a corpus, a char or BPE tokenizer with a [MASK] token, a bidirectional encoder, BERT's
masked-token objective; val masked-token accuracy is logged beside the unigram baseline's."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..data.text import TokenWindows, read_corpus, stack_windows
from ..text.mlm import HeldOutMaskedAccuracy, MaskedLM, MaskedLMObjective, MaskingConfig, MLMConfig
from ..text.tokenizers import TOKENIZER_FILE, BPETokenizer, CharTokenizer, load_tokenizer
from ..training import TrainConfig
from .common import RecipeRun
from .lm import LMDataConfig, refuse_vocabulary_override, saver

MASK_TOKEN = "[MASK]"


@dataclass
class MLMRecipe:
    """configs/mlm-*.yaml: model, data, masking and train sections."""

    model: MLMConfig = field(default_factory=MLMConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def held_out_windows(tokens: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """At most `count` non-overlapping windows (count, length) from the start of the held-out tokens."""
    count = min(count, len(tokens) // length)
    return tokens[: count * length].view(count, length)


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False):
    """Train a masked LM as `mmgen train mlm` does; returns (model, tokenizer)."""
    refuse_vocabulary_override(overrides)
    run = RecipeRun.open(MLMRecipe, config_path, overrides, run_dir, resume)
    recipe = run.recipe
    text = read_corpus(recipe.data.path)
    if resume and (run.folder.final / TOKENIZER_FILE).exists():
        tokenizer = load_tokenizer(run.folder.final)
    elif recipe.data.tokenizer == "char":
        tokenizer = CharTokenizer.train(text, specials=(MASK_TOKEN,))
    else:
        tokenizer = BPETokenizer.train(text, recipe.data.vocab_size, special_tokens=(MASK_TOKEN,))
    tokens = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    context = recipe.model.context_length
    split = int(len(tokens) * (1 - recipe.data.val_fraction))
    # TokenWindows yields length + 1 tokens (a next-token pair); an MLM sample is `context` tokens
    train_set, val_set = TokenWindows(tokens[:split], context - 1), TokenWindows(tokens[split:], context - 1)
    recipe.model = replace(recipe.model, vocab_size=tokenizer.vocab_size)

    mask_id = tokenizer.token_id(MASK_TOKEN)
    vocabulary = torch.arange(tokenizer.vocab_size)
    objective = MaskedLMObjective(mask_id, vocabulary[vocabulary != mask_id], recipe.masking)
    most_frequent = int(torch.bincount(tokens[:split], minlength=tokenizer.vocab_size).argmax())
    windows = held_out_windows(tokens[split:], context, recipe.train.eval_batches * recipe.train.batch_size)
    evaluation = HeldOutMaskedAccuracy(windows, objective, most_frequent, recipe.train.batch_size, recipe.train.seed)

    model = run.build_model(lambda: MaskedLM(recipe.model))
    run.state.print(f"masked LM: {model.num_parameters() / 1e6:.2f}M parameters, vocabulary {tokenizer.vocab_size} "
                    f"(with {MASK_TOKEN}), {len(tokens):,} tokens ({len(train_set):,} train windows, "
                    f"{len(windows)} held-out windows for masked accuracy)")
    model = run.fit(model, loss_fn=objective, train_dataset=train_set, val_dataset=val_set,
                    collate_fn=stack_windows, evaluate_fn=evaluation, save_fn=saver(tokenizer),
                    tokens_per_sample=context)
    return model, tokenizer
