"""`mmgen finetune diffusion`: adapt a trained text-to-image model's UNet (its CLIP text encoder stays frozen).

Teaching it a shape it never saw: data.train "shapes:train:2000:extra=heart" (mmgen.data.shapes.EXTRA_SHAPES),
with sample-grid prompts that name the new shape.

With data.latent_cache (a latent base, objective denoising), the VAE posterior moments and frozen text states are
cached once (mmgen.diffusion.latent_cache) and the run reads no pixels: fine-tuning Stable Diffusion, the VAE encoder
is the costly part of a step the cache removes.

Preference tuning (objective dpo, Diffusion-DPO: mmgen.diffusion.dpo) on shapes data: each caption's render is the
winner, the same layout with the wrong colour or shape the loser (mmgen.data.shape_pairs); data.train and data.val
must be shapes specs (their split, size, seed and extra shapes are used; caption options and cache are not).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from ..data.captions import build_caption_dataset
from ..data.robust import robust
from ..data.shape_pairs import ShapePreferencePairs
from ..diffusion.dpo import DiffusionDPOConfig, DiffusionDPOLoss
from ..diffusion.objective import CachedLatentLoss, DenoisingLoss, DiffusionLossConfig
from ..diffusion.text2img import TextToImage, tokenize_prompts
from ..errors import ConfigError
from ..training import TrainConfig
from .diffusion import (
    CaptionTokens,
    DiffusionDataConfig,
    SampleGrid,
    SampleGridConfig,
    check_clip_sampling,
    check_latent_cache_options,
    grid_prompts,
    latent_caches,
)
from .finetune import FinetuneConfig, adapt, start


@dataclass
class DiffusionFinetuneRecipe(FinetuneConfig):
    """configs/finetune-diffusion-*.yaml: base, method, lora, objective, dpo, data, loss, samples and train sections.

    objective: denoising (the `loss:` section) or dpo (Diffusion-DPO on shapes pairs, the `dpo:` section)."""

    objective: Literal["denoising", "dpo"] = "denoising"
    dpo: DiffusionDPOConfig = field(default_factory=DiffusionDPOConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    loss: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    samples: SampleGridConfig = field(default_factory=SampleGridConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class PairTokens:
    """Collate shape pairs into {"images": winners, "losers" (batch, 3, H, W), "tokens": CLIP tokens (batch, ctx)}."""

    def __init__(self, context_length: int):
        self.context_length = context_length

    def __call__(self, items: list[dict]) -> dict:
        return {"images": torch.stack([item["image"] for item in items]),
                "losers": torch.stack([item["loser"] for item in items]),
                "tokens": tokenize_prompts([item["caption"] for item in items], self.context_length)}


def preference_datasets(data: DiffusionDataConfig, image_size: int, seed: int):
    """(train, val-or-None) ShapePreferencePairs of the shapes specs data.train and data.val."""
    sets = []
    for key, spec, split in (("train", data.train, "train"), ("val", data.val, "val")):
        if spec is None:
            sets.append(None)
            continue
        if spec != "shapes" and not spec.startswith("shapes:"):
            raise ConfigError(f"data.{key}={spec!r}: objective dpo builds its pairs from shapes data "
                              "(a spec such as shapes:train:2000)")
        sets.append(ShapePreferencePairs(build_caption_dataset(spec, split=split, train=split == "train",
                                                               image_size=image_size, normalize="minus_one_to_one",
                                                               seed=seed)))
    return sets[0], sets[1]


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False,
          base: str | None = None) -> TextToImage:
    """Fine-tune a text-to-image model as `mmgen finetune diffusion` does; returns the trained (EMA) model."""
    run, model, _ = start(DiffusionFinetuneRecipe, TextToImage, config_path, run_dir, overrides, resume, base)
    recipe = run.recipe
    timesteps = model.schedule.num_train_timesteps
    if recipe.samples.steps > timesteps:
        raise ConfigError(f"samples.steps ({recipe.samples.steps}) exceeds the base's {timesteps} training timesteps")
    check_clip_sampling(recipe.samples, model.text_encoder, "the base's text encoder")
    data = recipe.data
    if data.latent_cache is not None:
        if recipe.objective != "denoising":
            raise ConfigError(f"data.latent_cache caches what objective denoising encodes; objective "
                              f"{recipe.objective} renders its own pairs: leave data.latent_cache out")
        check_latent_cache_options(model.vae is not None, data)
        data = replace(data, cache=False)  # the latent cache replaces the in-memory pixels
    if recipe.objective == "dpo":
        train_set, val_set = preference_datasets(data, model.config.image_size, recipe.train.seed)
    else:
        train_set, val_set = run.caption_datasets(model.config.image_size, "minus_one_to_one", data.shapes_options(),
                                                  data)
    prompts = grid_prompts(recipe.samples, val_set or train_set) if run.state.is_main_process else []

    model = run.build_model(lambda: model)
    caches = latent_caches(run, model, train_set, val_set) if data.latent_cache is not None else None
    save_fn, load_fn = adapt(model, recipe)
    if recipe.objective == "dpo":  # the reference: the base, as it is before training
        return run.fit(model, loss_fn=DiffusionDPOLoss(model, recipe.dpo), train_dataset=train_set,
                       val_dataset=val_set, collate_fn=PairTokens(model.context_length),
                       evaluate_fn=SampleGrid(run.folder.path, prompts, recipe.samples), save_fn=save_fn,
                       load_fn=load_fn)
    if caches is not None:  # built before the adapters, from the base's own frozen VAE and text encoder
        return run.fit(model, loss_fn=CachedLatentLoss(model, recipe.loss), train_dataset=caches[0],
                       val_dataset=caches[1], evaluate_fn=SampleGrid(run.folder.path, prompts, recipe.samples),
                       save_fn=save_fn, load_fn=load_fn)
    return run.fit(model, loss_fn=DenoisingLoss(model, recipe.loss), train_dataset=robust(train_set),
                   val_dataset=robust(val_set), collate_fn=CaptionTokens(model.context_length),
                   evaluate_fn=SampleGrid(run.folder.path, prompts, recipe.samples), save_fn=save_fn,
                   load_fn=load_fn, max_bad_fraction=recipe.data.max_bad_fraction)
