"""Text-to-image diffusion recipe (GLIDE-style): image–caption data -> a UNet on a frozen CLIP text encoder.

The CLIP is trained (or converted) first and named by `model.text_encoder`; its weights are copied into the
model, so the run folder needs nothing else afterwards. At each evaluation a grid of samples for fixed held-out
prompts is saved as RUN_DIR/samples/step-N.png (its path is logged in metrics.jsonl as samples/grid).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..clip.model import CLIP
from ..config import from_dict
from ..data.images import make_grid, save_png
from ..data.robust import BadSampleTracker, collate_captions
from ..diffusion.loss import diffusion_loss
from ..diffusion.samplers import standard_normal
from ..diffusion.schedule import NoiseSchedule
from ..diffusion.text2img import TextToImage, TextToImageConfig, tokenize_prompts
from ..diffusion.unet import UNetConfig
from ..errors import CheckpointError, ConfigError, UserError
from ..hub import latest_checkpoint, load_as, read_model_config
from ..pipelines.text2img import TextToImagePipeline
from ..training import TrainConfig, Trainer
from ..training.trainer import process_state
from .common import caption_datasets, check_run_dir, load_recipe_config, robust, write_run_config


@dataclass
class DiffusionModelSection:
    """The frozen text encoder (a CLIP run or model folder), the image size, the UNet and the noise schedule."""

    text_encoder: str = "runs/clip-shapes"
    image_size: int = 32
    unet: UNetConfig = field(default_factory=UNetConfig)  # context_dim and pooled_dim come from the text encoder
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)


@dataclass
class DiffusionDataConfig:
    """Where the image–caption pairs come from (see mmgen.data.captions.build_caption_dataset for the forms)."""

    train: str = "shapes"
    val: str | None = "shapes:val"
    columns: tuple[str, str] = ("image", "caption")
    templates: list[str] | None = None  # prompt templates turning a labelled folder's class names into captions
    crop_scale: tuple[float, float] | None = None  # None: resize + centre crop, no random crop
    max_bad_fraction: float = 0.01
    cache: bool = False  # decode the (finite) training set once and keep it in memory

    def __post_init__(self):
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")


@dataclass
class DiffusionLossConfig:
    """The denoising loss: caption dropout for classifier-free guidance, optional min-SNR-gamma weighting."""

    caption_dropout: float = 0.1  # this fraction of training captions is replaced by the empty prompt
    min_snr_gamma: float | None = None  # e.g. 5.0

    def __post_init__(self):
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1], got {self.caption_dropout}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive or null, got {self.min_snr_gamma}")


@dataclass
class SampleGridConfig:
    """The grid sampled at each evaluation (DDIM, fixed seed) from the EMA model."""

    prompts: list[str] | None = None  # None: the first `count` distinct captions of data.val (else data.train)
    count: int = 8  # 0: no grid
    steps: int = 25
    guidance_scale: float = 3.0
    seed: int = 0

    def __post_init__(self):
        if self.count < 0 or self.steps < 1 or self.guidance_scale < 0:
            raise ValueError(f"need count >= 0 (0: no grid), steps >= 1 and guidance_scale >= 0, got "
                             f"{self.count}, {self.steps}, {self.guidance_scale}")


@dataclass
class DiffusionRecipe:
    """configs/diffusion-*.yaml: model, data, loss, samples and train sections."""

    model: DiffusionModelSection = field(default_factory=DiffusionModelSection)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    loss: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    samples: SampleGridConfig = field(default_factory=SampleGridConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        timesteps = self.model.schedule.num_train_timesteps
        if self.samples.steps > timesteps:
            raise ValueError(f"samples.steps ({self.samples.steps}) exceeds the {timesteps} training timesteps")


class CaptionTokens:
    """collate_captions + the captions' CLIP tokens (runs in DataLoader workers)."""

    def __init__(self, context_length: int):
        self.context_length = context_length

    def __call__(self, items: list) -> dict:
        batch = collate_captions(items)
        batch["tokens"] = tokenize_prompts(batch["captions"], self.context_length)
        return batch


class DenoisingLoss:
    """loss_fn: noise the images at random timesteps, predict, diffusion_loss; in training, drop captions.

    Validation draws its timesteps and noise from a generator that `restart_validation` reseeds before each
    evaluation, so val/loss compares like with like and evaluation leaves the training RNG alone.
    """

    def __init__(self, schedule: NoiseSchedule, config: DiffusionLossConfig, context_length: int,
                 tracker: BadSampleTracker, seed: int):
        self.schedule, self.config, self.tracker, self.seed = schedule, config, tracker, seed
        self.empty_tokens = tokenize_prompts([""], context_length)  # (1, context_length)
        self.restart_validation()

    def restart_validation(self) -> None:
        """Reseed the validation draws."""
        self.validation_generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, model, batch: dict):
        images, tokens = batch["images"], batch["tokens"]
        generator = None
        if model.training:
            self.tracker.update(batch)
            dropped = torch.rand(len(tokens), device=tokens.device) < self.config.caption_dropout
            tokens = torch.where(dropped[:, None], self.empty_tokens.to(tokens.device), tokens)
        else:
            generator = self.validation_generator
        draw_on = generator.device if generator is not None else images.device
        t = torch.randint(0, self.schedule.num_train_timesteps, (len(images),), generator=generator, device=draw_on)
        t = t.to(images.device)
        noise = standard_normal(images.shape, generator, images.device, images.dtype)
        output = model(self.schedule.add_noise(images, noise, t), t, tokens)
        target = self.schedule.target(images, noise, t)
        loss = diffusion_loss(output, target, t, self.schedule, self.config.min_snr_gamma)
        return loss, ({"data/skipped_total": self.tracker.skipped} if self.tracker.skipped else {})


class SampleGrid:
    """Samples the prompts with the model (DDIM, fixed seed) and saves RUN_DIR/samples/step-N.png (main process)."""

    def __init__(self, run_dir: Path, prompts: list[str], config: SampleGridConfig):
        self.run_dir, self.prompts, self.config = run_dir, prompts, config

    def __call__(self, model: TextToImage, step: int) -> dict:
        if not self.prompts or not process_state().is_main_process:
            return {}
        config = self.config
        images = TextToImagePipeline(model)(self.prompts, steps=config.steps, guidance_scale=config.guidance_scale,
                                            seed=config.seed, progress=False)
        path = self.run_dir / "samples" / f"step-{step}.png"
        save_png(make_grid(images), path)
        return {"samples/grid": str(path.relative_to(self.run_dir))}


def distinct_captions(dataset, count: int) -> list[str]:
    """The first `count` distinct captions of a caption dataset, reading at most 50 * count items."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        items = iter(dataset)
    else:
        items = (dataset[index] for index in range(len(dataset)))
    captions: list[str] = []
    for item in itertools.islice(items, 50 * count):
        if isinstance(item, dict) and item["caption"] not in captions:
            captions.append(item["caption"])
            if len(captions) == count:
                break
    return captions


def load_text_encoder(path: str) -> CLIP:
    """The CLIP in a run or model folder; anything else is a ConfigError naming model.text_encoder."""
    try:
        return load_as(path, CLIP)
    except CheckpointError as error:
        raise ConfigError(f"model.text_encoder={path}: {error} (it needs a CLIP run or model folder: "
                          "`mmgen train clip` or `mmgen convert open-clip` first)") from None


def _unet_for(clip: CLIP, unet: UNetConfig) -> UNetConfig:
    """The UNet config with its context and pooled widths set by the text encoder (conflicting values refused)."""
    widths = {"context_dim": clip.config.text.width, "pooled_dim": clip.config.embed_dim}
    for name, width in widths.items():
        if getattr(unet, name) not in (None, width):
            raise ConfigError(f"model.unet.{name} is set by the text encoder ({width}); leave it out")
    return replace(unet, **widths)


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False) -> TextToImage:
    """Train a text-to-image model as `mmgen train diffusion` does; returns the (EMA) model."""
    from accelerate.utils import set_seed

    run_dir = Path(run_dir)
    recipe = load_recipe_config(DiffusionRecipe, config_path, list(overrides), run_dir, resume)
    state = process_state()
    check_run_dir(run_dir, resume)
    state.wait_for_everyone()
    checkpoint = latest_checkpoint(run_dir) if resume else None
    clip = None
    if checkpoint is None:  # a checkpoint holds the text encoder: resuming does not need the CLIP folder
        clip = load_text_encoder(recipe.model.text_encoder)
        recipe.model.unet = _unet_for(clip, recipe.model.unet)
    progress = recipe.train.progress and state.is_main_process
    train_set, val_set = caption_datasets(
        recipe.data, image_size=recipe.model.image_size, normalize="minus_one_to_one", seed=recipe.train.seed,
        rank=state.process_index, world_size=state.num_processes, num_workers=recipe.train.num_workers,
        progress=progress)
    prompts = []
    if state.is_main_process:
        if recipe.samples.count:
            prompts = recipe.samples.prompts or distinct_captions(val_set or train_set, recipe.samples.count)
            if not prompts:
                raise UserError("no usable caption found for the sample grid; set samples.prompts")
        write_run_config(run_dir, recipe)
    state.wait_for_everyone()

    set_seed(recipe.train.seed)
    if clip is not None:
        model = TextToImage.from_text_encoder(clip, recipe.model.image_size, recipe.model.unet, recipe.model.schedule)
    else:
        model = TextToImage(from_dict(TextToImageConfig, read_model_config(checkpoint)["config"], "config."))
    unet_parameters = sum(p.numel() for p in model.unet.parameters())
    state.print(f"text2img: UNet {unet_parameters / 1e6:.2f}M parameters on a frozen CLIP text encoder "
                f"(context {model.context_length} tokens x {model.config.unet.context_dim})")
    tracker = BadSampleTracker(recipe.data.max_bad_fraction)
    loss_fn = DenoisingLoss(model.schedule, recipe.loss, model.context_length, tracker, recipe.train.seed)
    grid = SampleGrid(run_dir, prompts, recipe.samples)

    def evaluate(model: TextToImage, step: int) -> dict:
        loss_fn.restart_validation()
        return grid(model, step)

    trainer = Trainer(
        model,
        recipe.train,
        run_dir,
        loss_fn=loss_fn,
        train_dataset=robust(train_set),
        val_dataset=robust(val_set) if val_set is not None else None,
        collate_fn=CaptionTokens(model.context_length),
        evaluate_fn=evaluate,
    )
    return trainer.fit(resume=resume)
