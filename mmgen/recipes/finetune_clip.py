"""`mmgen finetune clip`: adapt a trained CLIP to new image–caption data with the contrastive loss.

Teaching it a shape it never saw: data.train "shapes:train:4000:extra=heart" and data.zeroshot "shapes:extra=heart",
whose evaluations add zeroshot/new_top1 (zero-shot top-1 on held-out images of the new shape's classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..clip.model import CLIP
from ..clip.towers import TowerTraining
from ..training import TrainConfig
from .clip import (
    CLIPDataConfig,
    CLIPRecipe,
    HeldOutEvaluation,
    build_datasets,
    caption_collate,
    contrastive_objective,
)
from .finetune import FinetuneConfig, adapt, start


@dataclass
class CLIPFinetuneRecipe(FinetuneConfig):
    """configs/finetune-clip-*.yaml: base, method, lora, data, loss, accumulation, towers and train sections.

    towers.lock_image with method full is locked-image tuning (LiT) of the base, e.g. a converted open_clip model."""

    data: CLIPDataConfig = field(default_factory=CLIPDataConfig)
    loss: Literal["infonce", "siglip"] = "infonce"
    accumulation: Literal["cached-features", "micro-batches"] = "cached-features"
    towers: TowerTraining = field(default_factory=TowerTraining)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.towers.locks and self.method != "full":
            raise ValueError(f"towers.lock_image / lock_text need method: full ({self.method} already freezes the "
                             "base and trains adapters)")


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False, base: str | None = None) -> CLIP:
    """Fine-tune a CLIP as `mmgen finetune clip` does; returns the trained (adapted) model."""
    run, model, _ = start(CLIPFinetuneRecipe, CLIP, config_path, run_dir, overrides, resume, base)
    recipe = run.recipe
    # the CLIP recipe's data, loss and evaluation pieces, on the base's model config
    as_clip_recipe = CLIPRecipe(model=model.config, data=recipe.data, loss=recipe.loss,
                                accumulation=recipe.accumulation, towers=recipe.towers, train=recipe.train)
    train_set, val_set = build_datasets(as_clip_recipe, run.state.process_index, run.state.num_processes,
                                        run.progress)
    evaluation = HeldOutEvaluation(as_clip_recipe) if run.state.is_main_process else None

    model = run.build_model(lambda: model)
    objective = contrastive_objective(as_clip_recipe, model, run.state)
    save_fn, load_fn = adapt(model, recipe)
    return run.fit(model, loss_fn=objective, train_dataset=train_set, val_dataset=val_set,
                   collate_fn=caption_collate(recipe.data, model.config.text.context_length), evaluate_fn=evaluation,
                   save_fn=save_fn, load_fn=load_fn, max_bad_fraction=recipe.data.max_bad_fraction)
