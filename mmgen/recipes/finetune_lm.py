"""`mmgen finetune lm`: adapt a trained GPT to a text (next-token loss) or to instruction/response pairs.

Instruction tuning renders each JSONL pair with `data.template` and trains on the response tokens only;
`mmgen sample lm --template` renders a prompt the same way at generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..data.instructions import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    PLACEHOLDER,
    InstructionExamples,
    collate_instructions,
    read_instructions,
)
from ..data.text import read_corpus, stack_windows
from ..text.gpt import GPT
from ..text.tokenizers import load_tokenizer
from ..training import TrainConfig
from .finetune import FinetuneConfig, adapt, start
from .lm import next_token_loss, saver, text_datasets


@dataclass
class LMFinetuneData:
    """The text to adapt to: a plain corpus (`path`), or instruction/response pairs (`instructions`, JSONL)."""

    path: str | None = None  # None (and no instructions): Tiny Shakespeare
    instructions: str | None = None  # JSONL of {"instruction": ..., "response": ...}
    template: str = DEFAULT_TEMPLATE  # the prompt, with {instruction} where the instruction goes
    response_suffix: str = "\n"  # appended to every response and learned: where generation can --stop
    val_fraction: float = 0.1  # the last fraction of the text (or of the pairs) is held out

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.path is not None and self.instructions is not None:
            raise ValueError("give either path (a text) or instructions (JSONL pairs), not both")
        if self.template.count(PLACEHOLDER) != 1:
            raise ValueError(f"template must contain {PLACEHOLDER} exactly once, got {self.template!r}")


@dataclass
class LMFinetuneRecipe(FinetuneConfig):
    """configs/finetune-lm-*.yaml: base, method, lora, data and train sections."""

    data: LMFinetuneData = field(default_factory=LMFinetuneData)
    train: TrainConfig = field(default_factory=TrainConfig)


def response_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy on the response tokens only (prompt and padding targets are IGNORE_INDEX)."""
    logits = model(batch["inputs"])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE_INDEX)


def instruction_datasets(data: LMFinetuneData, tokenizer, context: int):
    """(train, val-or-None) InstructionExamples: the last `val_fraction` of the pairs is held out."""
    pairs = read_instructions(data.instructions)
    held_out = int(len(pairs) * data.val_fraction)
    split = len(pairs) - held_out
    options = dict(tokenizer=tokenizer, template=data.template, context_length=context,
                   response_suffix=data.response_suffix)
    train_set = InstructionExamples(pairs[:split], **options)
    val_set = InstructionExamples(pairs[split:], **options) if held_out else None
    return train_set, val_set


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False, base: str | None = None) -> GPT:
    """Fine-tune a GPT as `mmgen finetune lm` does; returns the trained (adapted) model."""
    run, model, folder = start(LMFinetuneRecipe, GPT, config_path, run_dir, overrides, resume, base)
    tokenizer = load_tokenizer(folder)
    context = model.config.context_length
    data = run.recipe.data
    if data.instructions is not None:
        train_set, val_set = instruction_datasets(data, tokenizer, context)
        loss_fn, collate_fn, tokens_per_sample = response_loss, collate_instructions, None
        skipped = train_set.dropped + (val_set.dropped if val_set else 0)
        run.state.print(f"{len(train_set)} instruction pairs for training, {len(val_set) if val_set else 0} held out"
                        + (f"; {skipped} dropped (prompt longer than the {context}-token context)" if skipped else ""))
    else:
        tokens = torch.tensor(tokenizer.encode(read_corpus(data.path)), dtype=torch.long)
        train_set, val_set = text_datasets(tokens, data.val_fraction, context)
        loss_fn, collate_fn, tokens_per_sample = next_token_loss, stack_windows, context

    model = run.build_model(lambda: model)
    save_fn, load_fn = adapt(model, run.recipe, save_model=saver(tokenizer))
    return run.fit(model, loss_fn=loss_fn, train_dataset=train_set, val_dataset=val_set, collate_fn=collate_fn,
                   save_fn=save_fn, load_fn=load_fn, tokens_per_sample=tokens_per_sample)
