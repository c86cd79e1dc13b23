"""`mmgen finetune diffusion`: adapt a trained text-to-image model's UNet (its CLIP text encoder stays frozen).

Teaching it a shape it never saw: data.train "shapes:train:2000:extra=heart" (mmgen.data.shapes.EXTRA_SHAPES),
with sample-grid prompts that name the new shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.robust import robust
from ..diffusion.objective import DenoisingLoss, DiffusionLossConfig
from ..diffusion.text2img import TextToImage
from ..errors import ConfigError
from ..training import TrainConfig
from .diffusion import (
    CaptionTokens,
    DiffusionDataConfig,
    SampleGrid,
    SampleGridConfig,
    grid_prompts,
)
from .finetune import FinetuneConfig, adapt, start


@dataclass
class DiffusionFinetuneRecipe(FinetuneConfig):
    """configs/finetune-diffusion-*.yaml: base, method, lora, data, loss, samples and train sections."""

    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    loss: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    samples: SampleGridConfig = field(default_factory=SampleGridConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False,
          base: str | None = None) -> TextToImage:
    """Fine-tune a text-to-image model as `mmgen finetune diffusion` does; returns the trained (EMA) model."""
    run, model, _ = start(DiffusionFinetuneRecipe, TextToImage, config_path, run_dir, overrides, resume, base)
    recipe = run.recipe
    timesteps = model.schedule.num_train_timesteps
    if recipe.samples.steps > timesteps:
        raise ConfigError(f"samples.steps ({recipe.samples.steps}) exceeds the base's {timesteps} training timesteps")
    train_set, val_set = run.caption_datasets(model.config.image_size, "minus_one_to_one", recipe.data.shapes_options())
    prompts = grid_prompts(recipe.samples, val_set or train_set) if run.state.is_main_process else []

    model = run.build_model(lambda: model)
    save_fn, load_fn = adapt(model, recipe)
    return run.fit(model, loss_fn=DenoisingLoss(model, recipe.loss), train_dataset=robust(train_set),
                   val_dataset=robust(val_set), collate_fn=CaptionTokens(model.context_length),
                   evaluate_fn=SampleGrid(run.folder.path, prompts, recipe.samples), save_fn=save_fn,
                   load_fn=load_fn, max_bad_fraction=recipe.data.max_bad_fraction)
