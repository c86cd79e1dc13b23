"""`mmgen finetune clip`: adapt a trained CLIP to new image–caption data with the contrastive loss.

Teaching it a shape it never saw: data.train "shapes:train:4000:extra=heart" and data.zeroshot "shapes:extra=heart",
whose evaluations add zeroshot/new_top1 (zero-shot top-1 on held-out images of the new shape's classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..clip.model import CLIP
from ..training import TrainConfig, Trainer
from .clip import CLIPDataConfig, CLIPRecipe, ContrastiveLoss, HeldOutEvaluation, TokenizingCollate, build_datasets
from .common import write_run_config
from .finetune import FinetuneConfig, adapt, start


@dataclass
class CLIPFinetuneRecipe(FinetuneConfig):
    """configs/finetune-clip-*.yaml: base, method, lora, data, loss and train sections."""

    data: CLIPDataConfig = field(default_factory=CLIPDataConfig)
    loss: Literal["infonce", "siglip"] = "infonce"
    train: TrainConfig = field(default_factory=TrainConfig)


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False, base: str | None = None) -> CLIP:
    """Fine-tune a CLIP as `mmgen finetune clip` does; returns the trained (adapted) model."""
    from accelerate.utils import set_seed

    run_dir, recipe, state, model, _ = start(CLIPFinetuneRecipe, CLIP, config_path, run_dir, overrides, resume, base)
    # the CLIP recipe's data, loss and evaluation pieces, on the base's model config
    as_clip_recipe = CLIPRecipe(model=model.config, data=recipe.data, loss=recipe.loss, train=recipe.train)
    progress = recipe.train.progress and state.is_main_process
    train_set, val_set = build_datasets(as_clip_recipe, state.process_index, state.num_processes, progress)
    evaluate = HeldOutEvaluation(as_clip_recipe) if state.is_main_process else (lambda model, step: {})
    if state.is_main_process:
        write_run_config(run_dir, recipe)
    state.wait_for_everyone()

    set_seed(recipe.train.seed)
    save_fn, load_fn = adapt(model, recipe)
    trainer = Trainer(
        model,
        recipe.train,
        run_dir,
        loss_fn=ContrastiveLoss(recipe.loss, recipe.data.max_bad_fraction),
        train_dataset=train_set,
        val_dataset=val_set,
        collate_fn=TokenizingCollate(model.config.text.context_length),
        evaluate_fn=evaluate,
        save_fn=save_fn,
        load_fn=load_fn,
    )
    return trainer.fit(resume=resume)
