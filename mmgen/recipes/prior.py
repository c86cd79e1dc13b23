"""unCLIP prior recipe: image–caption pairs -> a diffusion prior from CLIP text to CLIP image embeddings.

The frozen CLIP (`model.clip`, a CLIP run or model folder) gives both sides of each pair: the caption's tokens are
the condition, the image's scaled CLIP embedding is the clean sample x0. Its weights are copied into the prior, so
the run folder needs nothing else afterwards. Captions are replaced by the empty prompt `loss.caption_dropout` of the
time, for classifier-free guidance. Each evaluation samples embeddings for a fixed batch of held-out captions and
logs their mean cosine similarity to the true image embeddings (val/cosine) beside that of the captions' own text
embeddings (val/cosine_text_baseline), which the prior has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.robust import BadSampleTracker
from ..diffusion.prior import DiffusionPrior, PriorConfig, PriorTransformerConfig, default_prior_schedule
from ..diffusion.schedule import NoiseSchedule
from ..diffusion.text2img import tokenize_prompts
from ..errors import ConfigError, UserError
from ..pipelines.unclip import PriorPipeline
from ..run_folder import RunFolder
from ..training import TrainConfig, Trainer
from ..training.trainer import process_state
from .common import caption_datasets, open_run, robust, write_run_config
from .diffusion import CaptionTokens, DenoisingLoss, DiffusionDataConfig, DiffusionLossConfig
from .unclip import checkpoint_config, held_out_pairs, load_clip


@dataclass
class PriorModelSection:
    """The frozen CLIP (a CLIP run or model folder), the transformer and the noise schedule."""

    clip: str = "runs/clip-shapes"
    transformer: PriorTransformerConfig = field(default_factory=PriorTransformerConfig)
    schedule: NoiseSchedule = field(default_factory=default_prior_schedule)


@dataclass
class PriorSamplesConfig:
    """The similarity measured at each evaluation: `count` held-out pairs, sampled with DDIM and a fixed seed."""

    count: int = 64  # 0: none
    steps: int = 25
    guidance_scale: float = 2.0
    seed: int = 0

    def __post_init__(self):
        if self.count < 0 or self.steps < 1 or self.guidance_scale < 0:
            raise ValueError(f"need count >= 0 (0: none), steps >= 1 and guidance_scale >= 0, got "
                             f"{self.count}, {self.steps}, {self.guidance_scale}")


@dataclass
class PriorRecipe:
    """configs/prior-*.yaml: model, data, loss, samples and train sections."""

    model: PriorModelSection = field(default_factory=PriorModelSection)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    loss: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    samples: PriorSamplesConfig = field(default_factory=PriorSamplesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        timesteps = self.model.schedule.num_train_timesteps
        if self.samples.steps > timesteps:
            raise ValueError(f"samples.steps ({self.samples.steps}) exceeds the {timesteps} training timesteps")


@torch.no_grad()
def embedding_similarity(prior: DiffusionPrior, images: torch.Tensor, captions: list[str], *, steps: int,
                         guidance_scale: float, seed: int = 0, batch_size: int = 256,
                         progress: bool = False) -> dict[str, float]:
    """Mean cosine similarity to the true CLIP embeddings of `images` (CLIP-normalised, at the CLIP's size) of the
    prior's sampled embeddings for `captions` ("cosine") and of the captions' text embeddings ("cosine_text_baseline").
    """
    if len(images) != len(captions) or not captions:
        raise UserError(f"need as many images as captions, at least one; got {len(images)} and {len(captions)}")
    pipeline = PriorPipeline(prior)
    device = next(prior.parameters()).device
    sampled, baseline = [], []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        true = prior.clip.encode_image(images[start : start + batch_size].to(device))
        embeddings = pipeline(chunk, steps=steps, guidance_scale=guidance_scale, seed=seed + start, progress=progress)
        text = prior.encode_text(tokenize_prompts(chunk, prior.context_length).to(device)).embedding
        sampled.append((embeddings * true).sum(dim=-1))
        baseline.append((text * true).sum(dim=-1))
    return {"cosine": torch.cat(sampled).mean().item(), "cosine_text_baseline": torch.cat(baseline).mean().item()}


class SimilarityEvaluation:
    """The Trainer's evaluate_fn: reseed the validation draws, then (main process) val/cosine on the fixed pairs."""

    def __init__(self, loss_fn: DenoisingLoss, images: torch.Tensor, captions: list[str], config: PriorSamplesConfig):
        self.loss_fn, self.images, self.captions, self.config = loss_fn, images, captions, config

    def __call__(self, model: DiffusionPrior, step: int) -> dict:
        self.loss_fn.restart_validation()
        if not self.captions or not process_state().is_main_process:
            return {}
        config = self.config
        similarity = embedding_similarity(model, self.images, self.captions, steps=config.steps,
                                          guidance_scale=config.guidance_scale, seed=config.seed)
        return {f"val/{name}": value for name, value in similarity.items()}


class ImageTargets:
    """DenoisingLoss's encode_images for the prior: images -> scaled CLIP image embeddings (deterministic)."""

    def __init__(self, prior: DiffusionPrior):
        self.prior = prior

    def __call__(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        return self.prior.image_targets(images)


def new_model(section: PriorModelSection) -> DiffusionPrior:
    """A random prior on a copy of the frozen CLIP in section.clip."""
    return DiffusionPrior.from_clip(load_clip(section.clip), section.transformer, section.schedule)


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False) -> DiffusionPrior:
    """Train a diffusion prior as `mmgen train prior` does; returns the (EMA) model."""
    from accelerate.utils import set_seed

    run_dir = Path(run_dir)
    recipe, state = open_run(PriorRecipe, config_path, overrides, run_dir, resume)
    checkpoint = RunFolder(run_dir).latest() if resume else None
    set_seed(recipe.train.seed)
    # a checkpoint holds the CLIP: resuming does not need the CLIP folder
    if checkpoint is None:
        model = new_model(recipe.model)
    else:
        model = DiffusionPrior(checkpoint_config(checkpoint, PriorConfig))
    clip_config = model.config.clip
    train_set, val_set = caption_datasets(
        recipe.data, image_size=clip_config.vision.image_size, normalize="clip", seed=recipe.train.seed,
        rank=state.process_index, world_size=state.num_processes, num_workers=recipe.train.num_workers,
        progress=recipe.train.progress and state.is_main_process, shapes_options=recipe.data.shapes_options())
    images, captions = torch.empty(0), []
    if state.is_main_process:
        if recipe.samples.count:
            images, captions = held_out_pairs(val_set or train_set, recipe.samples.count)
            if not captions:
                raise ConfigError("no usable image-caption pair found for samples; set samples.count=0")
        write_run_config(run_dir, recipe)
    state.wait_for_everyone()

    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state.print(f"prior: transformer {parameters / 1e6:.2f}M parameters on a frozen CLIP "
                f"(embed_dim {model.embed_dim}, {model.context_length} text tokens, "
                f"predicting {model.schedule.prediction_type})")
    tracker = BadSampleTracker(recipe.data.max_bad_fraction)
    loss_fn = DenoisingLoss(model.schedule, recipe.loss, model.context_length, tracker, recipe.train.seed,
                            encode_images=ImageTargets(model))
    trainer = Trainer(
        model,
        recipe.train,
        run_dir,
        loss_fn=loss_fn,
        train_dataset=robust(train_set),
        val_dataset=robust(val_set) if val_set is not None else None,
        collate_fn=CaptionTokens(model.context_length),
        evaluate_fn=SimilarityEvaluation(loss_fn, images, captions, recipe.samples),
    )
    return trainer.fit(resume=resume)
