"""What every `mmgen finetune` recipe shares: the base model, the method (full, lora, qlora) and what a run saves.

A fine-tuning config is the recipe's own sections plus `base` (a run or model folder; --base sets it), `method` and
a `lora:` section (mmgen.finetune.LoRAConfig: rank, alpha, dropout, targets, 4-bit options). method full trains the
base's weights and writes model folders; lora and qlora freeze the base and write adapter folders
(adapter.safetensors + adapter_config.json naming the base) as checkpoints and final/, and resume from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

from ..errors import UserError
from ..finetune import (
    LoRAConfig,
    add_lora,
    load_adapter,
    parameter_counts,
    require_bitsandbytes,
    summary,
    target_layers,
    write_adapter,
)
from ..hub import load_as, resolve_model_folder
from ..training.trainer import default_load, default_save, process_state
from .common import RecipeRun, claim_run, load_recipe_config


@dataclass
class FinetuneConfig:
    """The keys every fine-tuning recipe starts with; `lora.method` follows `method`."""

    base: str | None = None  # the model to adapt: RUN_DIR, RUN_DIR/final or a model folder (--base)
    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # used by lora and qlora

    def __post_init__(self):
        if self.lora.method != "lora" and self.lora.method != self.method:
            raise ValueError(f"lora.method={self.lora.method!r} conflicts with method={self.method!r}; set method only")
        if self.method != "full":
            self.lora = replace(self.lora, method=self.method)


def start(schema: type, model_class: type, config_path, run_dir, overrides, resume: bool, base: str | None):
    """Validate the config (the run's own when resuming), refuse a used run folder, load the base.

    Returns (the RecipeRun, the base model, the base's folder)."""
    run_dir = Path(run_dir)
    recipe = load_recipe_config(schema, config_path, list(overrides), run_dir, resume)
    if base is not None:
        if resume and recipe.base is not None and Path(base) != Path(recipe.base):
            raise UserError(f"--base {base}: the run in {run_dir} fine-tunes {recipe.base}; leave --base out to resume")
        recipe.base = str(base)
    if recipe.base is None:
        raise UserError("--base CHECKPOINT is required: the run or model folder to fine-tune")
    state = process_state()
    claim_run(run_dir, resume, state)
    folder = resolve_model_folder(recipe.base)
    model = load_as(folder, model_class)
    if recipe.method != "full":  # the adapter's problems surface before anything is written
        target_layers(model, recipe.lora.targets)
        if recipe.method == "qlora":
            require_bitsandbytes()
    return RecipeRun(recipe, state, run_dir, resume), model, folder


def adapt(model, recipe: FinetuneConfig, save_model: Callable = default_save) -> tuple[Callable, Callable]:
    """Prepare `model` for `recipe.method` (in place) and return the Trainer's (save_fn, load_fn).

    full: `save_model` writes model folders; lora / qlora: adapters are added and only they are saved and loaded."""
    state = process_state()
    if recipe.method == "full":
        trainable, total = parameter_counts(model)
        state.print(f"full fine-tuning: {trainable:,} of {total:,} parameters trainable "
                    f"({100 * trainable / total:.2f}%)")
        return save_model, default_load
    add_lora(model, recipe.lora)
    state.print(summary(model))
    base = recipe.base

    def save_adapter_files(model, folder: Path) -> None:
        write_adapter(model, folder, base=base)

    return save_adapter_files, load_adapter
