"""`mmgen finetune lm`: adapt a trained GPT to a text (next-token loss), to instruction/response pairs, or (objective
dpo) to preference pairs.

Instruction tuning renders each JSONL pair with `data.template` and trains on the response tokens only;
`mmgen sample lm --template` renders a prompt the same way at generation. Preference tuning (DPO, mmgen.text.dpo)
reads prompt/chosen/rejected JSONL (`data.preferences`); its reference is the base (with LoRA: the adapted model
with its adapters disabled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
from ..data.preferences import PreferencePairs, collate_preferences, read_preferences
from ..data.text import read_corpus, stack_windows
from ..text.dpo import DPOConfig, DPOLoss, PreferenceEvaluation
from ..text.gpt import GPT
from ..text.tokenizers import load_tokenizer
from ..training import TrainConfig
from .finetune import FinetuneConfig, adapt, start
from .lm import next_token_loss, saver, text_datasets


@dataclass
class LMFinetuneData:
    """The text to adapt to: a plain corpus (`path`), instruction/response pairs (`instructions`, JSONL), or
    preference pairs (`preferences`, JSONL, for objective dpo)."""

    path: str | None = None  # None (and no instructions or preferences): Tiny Shakespeare
    instructions: str | None = None  # JSONL of {"instruction": ..., "response": ...}
    preferences: str | None = None  # JSONL of {"prompt": ..., "chosen": ..., "rejected": ...}
    template: str = DEFAULT_TEMPLATE  # the prompt, with {instruction} where the instruction goes
    response_suffix: str = "\n"  # appended to every response and learned: where generation can --stop
    val_fraction: float = 0.1  # the last fraction of the text (or of the pairs) is held out

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if sum(value is not None for value in (self.path, self.instructions, self.preferences)) > 1:
            raise ValueError("give one of path (a text), instructions or preferences (JSONL pairs), not several")
        if self.template.count(PLACEHOLDER) != 1:
            raise ValueError(f"template must contain {PLACEHOLDER} exactly once, got {self.template!r}")


@dataclass
class LMFinetuneRecipe(FinetuneConfig):
    """configs/finetune-lm-*.yaml: base, method, lora, objective, dpo, data and train sections.

    objective: sft (next-token loss on a text or on instruction responses) or dpo (data.preferences)."""

    objective: Literal["sft", "dpo"] = "sft"
    dpo: DPOConfig = field(default_factory=DPOConfig)  # used by objective dpo
    data: LMFinetuneData = field(default_factory=LMFinetuneData)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        super().__post_init__()
        if (self.objective == "dpo") != (self.data.preferences is not None):
            raise ValueError("objective dpo trains on data.preferences (prompt/chosen/rejected JSONL), and only it: "
                             "set both or neither")


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


def preference_datasets(data: LMFinetuneData, tokenizer, context: int):
    """(train, val-or-None) PreferencePairs: the last `val_fraction` of the pairs is held out."""
    triples = read_preferences(data.preferences)
    held_out = int(len(triples) * data.val_fraction)
    split = len(triples) - held_out
    train_set = PreferencePairs(triples[:split], tokenizer, context)
    val_set = PreferencePairs(triples[split:], tokenizer, context) if held_out else None
    return train_set, val_set


def pair_counts(kind: str, train_set, val_set, context: int) -> str:
    """"N <kind> pairs for training, M held out; K dropped (...)": the line a run prints about its pairs."""
    skipped = train_set.dropped + (val_set.dropped if val_set else 0)
    return (f"{len(train_set)} {kind} pairs for training, {len(val_set) if val_set else 0} held out"
            + (f"; {skipped} dropped (prompt longer than the {context}-token context)" if skipped else ""))


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False, base: str | None = None) -> GPT:
    """Fine-tune a GPT as `mmgen finetune lm` does; returns the trained (adapted) model."""
    run, model, folder = start(LMFinetuneRecipe, GPT, config_path, run_dir, overrides, resume, base)
    tokenizer = load_tokenizer(folder)
    context = model.config.context_length
    data = run.recipe.data
    if data.preferences is not None:
        train_set, val_set = preference_datasets(data, tokenizer, context)
        loss_fn, collate_fn, tokens_per_sample = None, collate_preferences, None  # DPOLoss once adapters are on
        run.state.print(pair_counts("preference", train_set, val_set, context))
    elif data.instructions is not None:
        train_set, val_set = instruction_datasets(data, tokenizer, context)
        loss_fn, collate_fn, tokens_per_sample = response_loss, collate_instructions, None
        run.state.print(pair_counts("instruction", train_set, val_set, context))
    else:
        tokens = torch.tensor(tokenizer.encode(read_corpus(data.path)), dtype=torch.long)
        train_set, val_set = text_datasets(tokens, data.val_fraction, context)
        loss_fn, collate_fn, tokens_per_sample = next_token_loss, stack_windows, context

    model = run.build_model(lambda: model)
    save_fn, load_fn = adapt(model, run.recipe, save_model=saver(tokenizer))
    evaluate_fn = None
    if run.recipe.objective == "dpo":
        loss_fn = DPOLoss(model, run.recipe.dpo)  # the reference: the base, as it is before training
        train_config = run.recipe.train
        if val_set is not None:
            evaluate_fn = PreferenceEvaluation(loss_fn, val_set, collate_fn, train_config.batch_size,
                                               train_config.eval_batches)
    return run.fit(model, loss_fn=loss_fn, train_dataset=train_set, val_dataset=val_set, collate_fn=collate_fn,
                   evaluate_fn=evaluate_fn, save_fn=save_fn, load_fn=load_fn, tokens_per_sample=tokens_per_sample)
