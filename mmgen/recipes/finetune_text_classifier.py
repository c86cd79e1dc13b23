"""`mmgen finetune text-classifier`: a trained GPT or masked LM + a classification head on a text,label table.

method full trains every weight; lora trains low-rank adapters on the backbone plus the (new) head, and saves the
merged classifier, so final/ is always a "text-classifier" model folder (mmgen.text.TextClassifier) with the base's
tokenizer beside it. Accuracy is reported on a held-out split (data.val, or a seeded per-class share of data.train).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.nn import functional as F

from ..data.text_table import LabelledTexts, class_names, collate_texts, read_labelled_texts
from ..errors import ConfigError, UserError
from ..finetune import add_lora, merge_adapter, summary
from ..hub import load, resolve_model_folder
from ..text.classifier import TextClassifier
from ..text.gpt import GPT
from ..text.mlm import MaskedLM
from ..text.tokenizers import load_tokenizer
from ..training import TrainConfig
from ..training.trainer import process_state
from .common import RecipeRun, claim_run, load_recipe_config
from .finetune import FinetuneConfig, adapt
from .finetune_classifier import held_out_split
from .lm import saver


@dataclass
class TextTableData:
    """A .csv / .tsv / .jsonl table of text,label rows and where the held-out rows come from."""

    train: str | None = None  # required
    val: str | None = None  # a table with the same columns; None: hold out val_fraction of train
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = 0.2  # per class, seeded by train.seed

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")


@dataclass
class TextClassifierRecipe(FinetuneConfig):
    """A text-classifier config: base (a GPT or masked LM), method (full or lora), pooling, data and train."""

    method: Literal["full", "lora", "qlora"] = "full"
    pooling: Literal["auto", "last", "first", "mean"] = "auto"  # auto: last for a GPT, mean for a masked LM
    data: TextTableData = field(default_factory=TextTableData)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.method == "qlora":
            raise ValueError("text-classifier trains with method full or lora, not qlora")


def text_datasets(data: TextTableData, tokenizer, max_tokens: int, seed: int):
    """(train, held-out, class names) from the table(s); the classes are the training rows' labels."""
    if data.train is None:
        raise UserError("data.train is required: a .csv / .tsv / .jsonl table of text,label rows")
    pairs = read_labelled_texts(data.train, data.text_column, data.label_column)
    classes = class_names([label for _, label in pairs], data.train)
    if data.val is not None:
        val_pairs = read_labelled_texts(data.val, data.text_column, data.label_column)
        source = data.val
    else:
        train_indices, val_indices = held_out_split([label for _, label in pairs], data.val_fraction, seed)
        if not val_indices:
            raise UserError(f"{data.train}: too few rows per class to hold any out; add rows or set data.val")
        pairs, val_pairs, source = [pairs[i] for i in train_indices], [pairs[i] for i in val_indices], data.train
    return (LabelledTexts(pairs, tokenizer, classes, max_tokens, data.train),
            LabelledTexts(val_pairs, tokenizer, classes, max_tokens, source), classes)


def classification_loss(model, batch: dict):
    """loss_fn: cross-entropy of the class logits (and the batch's accuracy)."""
    logits = model(batch["tokens"], batch["padding_mask"])
    accuracy = (logits.argmax(dim=-1) == batch["labels"]).float().mean()
    return F.cross_entropy(logits.float(), batch["labels"]), {"train/accuracy": accuracy.item()}


class HeldOutAccuracy:
    """evaluate_fn: accuracy on every held-out row, beside always answering the most frequent training class."""

    def __init__(self, dataset: LabelledTexts, majority_class: int, batch_size: int = 64):
        self.dataset, self.majority_class, self.batch_size = dataset, majority_class, batch_size

    @torch.no_grad()
    def __call__(self, model: TextClassifier, step: int | None = None) -> dict:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        correct = 0
        for start in range(0, len(self.dataset), self.batch_size):
            batch = collate_texts(self.dataset.items[start : start + self.batch_size])
            logits = model(batch["tokens"].to(device), batch["padding_mask"].to(device))
            correct += (logits.argmax(dim=-1).cpu() == batch["labels"]).sum().item()
        model.train(was_training)
        majority = sum(label == self.majority_class for _, label in self.dataset.items)
        return {"val/accuracy": correct / len(self.dataset), "val/majority_accuracy": majority / len(self.dataset)}


def lora_with_head(model: TextClassifier, recipe: TextClassifierRecipe, tokenizer):
    """Add LoRA adapters to the backbone and keep the new head trainable; the Trainer's (save_fn, load_fn) write
    the merged classifier (a copy: training goes on with the adapters) and refuse to resume from it."""
    add_lora(model, recipe.lora)
    model.head.requires_grad_(True)
    process_state().print(summary(model) + " (adapters + the classification head)")
    save_folder = saver(tokenizer)

    def save_merged(model, folder: Path) -> None:
        save_folder(merge_adapter(copy.deepcopy(model)), folder)

    def refuse_resume(model, folder: Path) -> None:
        raise UserError(f"{folder}: a lora text-classifier run saves merged classifiers and cannot be resumed; "
                        "start a new run (or use method full)")

    return save_merged, refuse_resume


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False,
          base: str | None = None) -> TextClassifier:
    """Train a text classifier as `mmgen finetune text-classifier` does; returns it."""
    run_dir = Path(run_dir)
    recipe = load_recipe_config(TextClassifierRecipe, config_path, list(overrides), run_dir, resume)
    if base is not None:
        if resume and recipe.base is not None and Path(base) != Path(recipe.base):
            raise UserError(f"--base {base}: the run in {run_dir} fine-tunes {recipe.base}; leave --base out to resume")
        recipe.base = str(base)
    if recipe.base is None:
        raise UserError("--base CHECKPOINT is required: the GPT or masked-LM run or model folder")
    folder = resolve_model_folder(recipe.base)
    backbone = load(folder)
    if not isinstance(backbone, (GPT, MaskedLM)):
        raise UserError(f"{folder} holds a {backbone.model_type!r} model, not a GPT or masked language model")
    if isinstance(backbone, GPT) and recipe.pooling == "first":
        raise ConfigError("pooling: a GPT's first token sees only itself; use last, mean or auto")
    tokenizer = load_tokenizer(folder)
    train_set, val_set, classes = text_datasets(recipe.data, tokenizer, backbone.config.context_length,
                                                recipe.train.seed)
    majority = max(range(len(classes)), key=lambda c: sum(label == c for _, label in train_set.items))
    evaluation = HeldOutAccuracy(val_set, majority, recipe.train.batch_size)
    state = process_state()
    claim_run(run_dir, resume, state)  # every input checked: only now is anything written
    run = RecipeRun(recipe, state, run_dir, resume)

    pooling = None if recipe.pooling == "auto" else recipe.pooling
    model = run.build_model(lambda: TextClassifier.from_backbone(backbone, classes, pooling), TextClassifier)
    state.print(f"{len(classes)} classes, {len(train_set)} training texts, {len(val_set)} held out; "
                f"{model.config.pooling} pooling on a {'GPT' if model.config.gpt else 'masked LM'}")
    if recipe.method == "lora":
        save_fn, load_fn = lora_with_head(model, recipe, tokenizer)
    else:
        save_fn, load_fn = adapt(model, recipe, save_model=saver(tokenizer))
    return run.fit(model, loss_fn=classification_loss, train_dataset=train_set, val_dataset=val_set,
                   collate_fn=collate_texts, evaluate_fn=evaluation, save_fn=save_fn, load_fn=load_fn)
