"""`mmgen finetune diffusion`: adapt a trained text-to-image model's UNet (its CLIP text encoder stays frozen).

Teaching it a shape it never saw: data.train "shapes:train:2000:extra=heart" (mmgen.data.shapes.EXTRA_SHAPES),
with sample-grid prompts that name the new shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.robust import BadSampleTracker
from ..diffusion.text2img import TextToImage
from ..errors import ConfigError
from ..training import TrainConfig, Trainer
from .common import caption_datasets, robust, write_run_config
from .diffusion import (
    CaptionTokens,
    DenoisingLoss,
    DiffusionDataConfig,
    DiffusionLossConfig,
    SampleGrid,
    SampleGridConfig,
    evaluation,
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
    from accelerate.utils import set_seed

    run_dir, recipe, state, model, _ = start(DiffusionFinetuneRecipe, TextToImage, config_path, run_dir, overrides,
                                             resume, base)
    timesteps = model.schedule.num_train_timesteps
    if recipe.samples.steps > timesteps:
        raise ConfigError(f"samples.steps ({recipe.samples.steps}) exceeds the base's {timesteps} training timesteps")
    progress = recipe.train.progress and state.is_main_process
    train_set, val_set = caption_datasets(
        recipe.data, image_size=model.config.image_size, normalize="minus_one_to_one", seed=recipe.train.seed,
        rank=state.process_index, world_size=state.num_processes, num_workers=recipe.train.num_workers,
        progress=progress, shapes_options=recipe.data.shapes_options())
    prompts = []
    if state.is_main_process:
        prompts = grid_prompts(recipe.samples, val_set or train_set)
        write_run_config(run_dir, recipe)
    state.wait_for_everyone()

    set_seed(recipe.train.seed)
    save_fn, load_fn = adapt(model, recipe)
    tracker = BadSampleTracker(recipe.data.max_bad_fraction)
    loss_fn = DenoisingLoss(model.schedule, recipe.loss, model.context_length, tracker, recipe.train.seed,
                            encode_images=model.encode_images)
    trainer = Trainer(
        model,
        recipe.train,
        run_dir,
        loss_fn=loss_fn,
        train_dataset=robust(train_set),
        val_dataset=robust(val_set) if val_set is not None else None,
        collate_fn=CaptionTokens(model.context_length),
        evaluate_fn=evaluation(loss_fn, SampleGrid(run_dir, prompts, recipe.samples)),
        save_fn=save_fn,
        load_fn=load_fn,
    )
    return trainer.fit(resume=resume)
