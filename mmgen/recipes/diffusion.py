"""Text-to-image diffusion recipe (GLIDE-style): image–caption data -> a UNet on a frozen CLIP text encoder.

The CLIP is trained (or converted) first and named by `model.text_encoder`; its weights are copied into the
model, so the run folder needs nothing else afterwards. At each evaluation a grid of samples for fixed held-out
prompts is saved as RUN_DIR/samples/step-N.png (its path is logged in metrics.jsonl as samples/grid).

With `model.vae` (a VAE run or model folder) the same recipe trains latent diffusion: the VAE is copied into the
model beside the CLIP, and the UNet learns to denoise its latents (`mmgen train latent-diffusion` requires it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import torch

from ..clip.model import CLIP
from ..clip.preprocess import clip_input
from ..data.images import make_grid, save_png
from ..data.robust import collate_captions, robust
from ..diffusion.guidance import check_clip_sampling_values
from ..diffusion.objective import CachedLatentLoss, DenoisingLoss, DiffusionLossConfig
from ..diffusion.samplers import SAMPLERS, check_guidance_interval
from ..diffusion.schedule import NoiseSchedule
from ..diffusion.text2img import CLIP_SAMPLING, TextToImage, TextToImageConfig, tokenize_prompts
from ..diffusion.unet import UNetConfig
from ..diffusion.vae import VAE
from ..errors import CheckpointError, ConfigError, UserError
from ..hub import load_as
from ..pipelines.text2img import TextToImagePipeline
from ..training import TrainConfig
from ..training.trainer import process_state
from .common import RecipeRun


@dataclass
class DiffusionModelSection:
    """The frozen text encoder (a CLIP run or model folder), the image size, the UNet and the noise schedule;
    optionally a frozen VAE (a VAE run or model folder) whose latents the UNet denoises (None: pixels)."""

    text_encoder: str = "runs/clip-shapes"
    image_size: int = 32
    unet: UNetConfig = field(default_factory=UNetConfig)  # context_dim and pooled_dim come from the text encoder
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    vae: str | None = None  # with a VAE: unet.in_channels and out_channels are its latent_channels
    # pixel models: the UNet denoises (images - pixel_shift) * pixel_scale (TextToImageConfig), e.g. to bring dark,
    # low-contrast images to a natural image's spread (std ~0.5 in [-1, 1]); the defaults are the images
    pixel_shift: float = 0.0
    pixel_scale: float = 1.0


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
    # shards whose samples have several captions (.txt lines, a .json list): training draws one per sample, seeded
    # ("random"), or takes the first; evaluation always takes the first
    captions_per_image: Literal["random", "first"] = "random"
    # latent diffusion: a folder of cached VAE posterior moments and frozen text states (mmgen.diffusion.latent_cache),
    # written on the first run and reused while data and encoders match; training then reads no pixels
    latent_cache: str | None = None
    # shapes only: the fraction of training captions naming only some attributes (None: the dataset's default),
    # and whether such a caption without a colour comes with a grey image (CLIP's trick; a generator wants colour)
    partial_captions: float | None = None
    grey_without_colour: bool = False

    def __post_init__(self):
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")
        if self.partial_captions is not None and not 0.0 <= self.partial_captions <= 1.0:
            raise ValueError(f"partial_captions must lie in [0, 1] or be null, got {self.partial_captions}")

    def shapes_options(self) -> dict:
        """The ShapesDataset options of the training set."""
        options = {"grey_without_colour": self.grey_without_colour}
        if self.partial_captions is not None:
            options["partial_captions"] = self.partial_captions
        return options


@dataclass
class SampleGridConfig:
    """The grid sampled at each evaluation (fixed seed) from the EMA model. Its sampler, steps and guidance_scale are
    also stored with the model as its sampling defaults (config.json's sampler, sampling_steps, guidance_scale), which
    `mmgen sample text2img` and TextToImagePipeline use unless told otherwise."""

    prompts: list[str] | None = None  # None: the first `count` distinct captions of data.val (else data.train)
    count: int = 8  # 0: no grid
    sampler: str = "ddim"  # a kind of mmgen.diffusion.samplers.SAMPLERS
    steps: int = 25
    guidance_scale: float = 3.0  # the grid's, and the model's stored sampling default unless guidance_choices picks
    # at each evaluation, sample the grid prompts at each of these scales and store as the model's default the one
    # whose images the model's own CLIP matches best to their prompts (ties: the smallest scale); None: no choice
    guidance_choices: list[float] | None = None
    # guide only at timesteps [t_low, t_high] (Kynkäänniemi et al. 2024), stored with the model; None: every step for
    # a new model, and a fine-tuned base keeps the interval it has
    guidance_interval: list[int] | None = None
    # CLIP guidance with the model's own CLIP (text-to-image models) for the grid, stored with the model as its
    # default (config.json's clip_guidance_scale); None: none for the grid, and the model keeps what it has (a new
    # model: 0)
    clip_guidance_scale: float | None = None
    # shifted copies of each x0 estimate CLIP guidance scores (config.json's clip_guidance_views); None: as above
    clip_guidance_views: int | None = None
    # candidates drawn per grid image, the one the model's own CLIP matches best to its prompt kept (DALL-E's
    # reranking), stored with the model as its default (config.json's clip_rerank); None: as clip_guidance_scale
    clip_rerank: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.count < 0 or self.steps < 1 or self.guidance_scale < 0:
            raise ValueError(f"need count >= 0 (0: no grid), steps >= 1 and guidance_scale >= 0, got "
                             f"{self.count}, {self.steps}, {self.guidance_scale}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.guidance_choices is not None and (not self.guidance_choices or min(self.guidance_choices) < 0):
            raise ValueError(f"guidance_choices must be a non-empty list of scales >= 0 or null, "
                             f"got {self.guidance_choices}")
        check_guidance_interval(self.guidance_interval)
        check_clip_sampling_values(self.clip_guidance_scale, self.clip_guidance_views, self.clip_rerank)
        for name, on in (("clip_guidance_scale", (self.clip_guidance_scale or 0) > 0),
                         ("clip_rerank", (self.clip_rerank or 1) > 1)):
            if on and self.guidance_choices:
                raise ValueError(f"guidance_choices are judged by the model's own CLIP, which {name} steers the "
                                 f"samples towards: set one or the other")


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


class SampleGrid:
    """Samples the prompts with the model (DDIM, fixed seed) and saves RUN_DIR/samples/step-N.png (main process)."""

    def __init__(self, run_dir: Path, prompts: list[str], config: SampleGridConfig):
        self.run_dir, self.prompts, self.config = run_dir, prompts, config

    def __call__(self, model: TextToImage, step: int) -> dict:
        if not self.prompts or not process_state().is_main_process:
            return {}
        config, metrics = self.config, {}
        if config.guidance_interval is not None:  # the grid's, also when a resumed run changed it
            model.config.guidance_interval = config.guidance_interval
        store_clip_sampling(model, config)  # the same
        if config.guidance_choices:
            metrics = self.choose_guidance(model)
        guidance = model.config.guidance_scale if config.guidance_choices else config.guidance_scale
        images = TextToImagePipeline(model)(self.prompts, sampler=config.sampler, steps=config.steps,
                                            guidance_scale=guidance, seed=config.seed, progress=False,
                                            clip_guidance_scale=config.clip_guidance_scale or 0.0,
                                            clip_rerank=config.clip_rerank or 1,
                                            clip_guidance_views=config.clip_guidance_views or 1)
        path = self.run_dir / "samples" / f"step-{step}.png"
        save_png(make_grid(images), path)
        return {**metrics, "samples/grid": str(path.relative_to(self.run_dir))}

    @torch.no_grad()
    def choose_guidance(self, model: TextToImage) -> dict:
        """Sample the prompts at each of guidance_choices; the model's own frozen CLIP names, for each image, the
        closest of the distinct prompts; the scale with the most right answers becomes model.config.guidance_scale
        (what final/ stores and `mmgen sample text2img` uses by default)."""
        config, clip = self.config, model.text_encoder
        distinct = list(dict.fromkeys(self.prompts))
        if len(distinct) < 2:
            return {}
        device = next(model.parameters()).device
        tokens = tokenize_prompts(distinct, clip.config.text.context_length).to(device)
        text = clip.encode_text(tokens)  # (prompts, embed_dim), unit length
        answers = torch.tensor([distinct.index(prompt) for prompt in self.prompts], device=device)

        def accuracy(scale: float) -> float:
            images = TextToImagePipeline(model)(self.prompts, sampler=config.sampler, steps=config.steps,
                                                guidance_scale=scale, clip_guidance_scale=0.0, clip_rerank=1,
                                                seed=config.seed, progress=False, output_type="pt")
            embeddings = clip.encode_image(clip_input(images.to(device), clip.config.vision.image_size))
            return ((embeddings @ text.T).argmax(dim=1) == answers).float().mean().item()

        return store_best_guidance(model, config.guidance_choices, accuracy, "samples/clip_prompt_accuracy")


def store_best_guidance(model, choices: list[float], score: Callable[[float], float], metric: str) -> dict:
    """Score each of `choices` (ascending); the best (ties: the smallest) becomes model.config.guidance_scale. Returns
    the metrics to log: METRIC@G per scale, and samples/guidance_scale."""
    metrics, best = {}, None
    for scale in sorted(choices):
        value = metrics[f"{metric}@{scale:g}"] = score(scale)
        if best is None or value > best[1]:
            best = (scale, value)
    model.config.guidance_scale = best[0]
    metrics["samples/guidance_scale"] = best[0]
    return metrics


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


def grid_prompts(samples: SampleGridConfig, dataset) -> list[str]:
    """The sample grid's prompts: samples.prompts, else the first samples.count distinct captions of `dataset`."""
    if not samples.count:
        return []
    prompts = samples.prompts or distinct_captions(dataset, samples.count)
    if not prompts:
        raise UserError("no usable caption found for the sample grid; set samples.prompts")
    return prompts


def load_text_encoder(path: str) -> CLIP:
    """The CLIP in a run or model folder; anything else is a ConfigError naming model.text_encoder."""
    try:
        return load_as(path, CLIP)
    except CheckpointError as error:
        raise ConfigError(f"model.text_encoder={path}: {error} (it needs a CLIP run or model folder: "
                          "`mmgen train clip` or `mmgen convert open-clip` first)") from None


def load_vae(path: str, unet: UNetConfig) -> VAE:
    """The VAE in a run or model folder, checked against the UNet's channels; anything else is a ConfigError."""
    try:
        vae = load_as(path, VAE)
    except CheckpointError as error:
        raise ConfigError(f"model.vae={path}: {error} (it needs a VAE run or model folder: `mmgen train vae` or "
                          "`mmgen convert diffusers-vae` first)") from None
    latent_channels = vae.config.latent_channels
    if (unet.in_channels, unet.out_channels) != (latent_channels, latent_channels):
        raise ConfigError(f"model.unet.in_channels and out_channels ({unet.in_channels}, {unet.out_channels}) must "
                          f"be the {latent_channels} latent channels of the VAE in model.vae={path}")
    return vae


def _unet_for(clip: CLIP, unet: UNetConfig) -> UNetConfig:
    """The UNet config with its context and pooled widths set by the text encoder (conflicting values refused)."""
    widths = {"context_dim": clip.config.text.width, "pooled_dim": clip.config.embed_dim}
    for name, width in widths.items():
        if getattr(unet, name) not in (None, width):
            raise ConfigError(f"model.unet.{name} is set by the text encoder ({width}); leave it out")
    return replace(unet, **widths)


def check_model_section(clip: CLIP, vae: VAE | None, section: DiffusionModelSection) -> None:
    """Refuse a model section that does not fit its CLIP and VAE with a ConfigError, before anything is written."""
    try:
        TextToImageConfig(section.image_size, section.unet, section.schedule, clip.config,
                          vae.config if vae is not None else None, pixel_shift=section.pixel_shift,
                          pixel_scale=section.pixel_scale)
    except ValueError as error:
        raise ConfigError(f"config section 'model': {error}") from None


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False,
          schema: type = DiffusionRecipe) -> TextToImage:
    """Train a text-to-image model as `mmgen train diffusion` does (a `schema` config); returns the (EMA) model."""
    run = RecipeRun.open(schema, config_path, overrides, run_dir, resume)
    recipe = run.recipe
    clip = vae = None
    if run.checkpoint() is None:  # a checkpoint holds the text encoder and VAE: resuming needs neither folder
        clip = load_text_encoder(recipe.model.text_encoder)
        recipe.model.unet = _unet_for(clip, recipe.model.unet)
        vae = load_vae(recipe.model.vae, recipe.model.unet) if recipe.model.vae is not None else None
        check_model_section(clip, vae, recipe.model)
        check_clip_sampling(recipe.samples, clip, f"model.text_encoder={recipe.model.text_encoder}")
    data = recipe.data
    if data.latent_cache is not None:
        check_latent_cache_options(recipe.model.vae is not None, data)
        data = replace(data, cache=False)  # the latent cache replaces the in-memory pixels
    train_set, val_set = run.caption_datasets(recipe.model.image_size, "minus_one_to_one", data.shapes_options(), data)
    prompts = grid_prompts(recipe.samples, val_set or train_set) if run.state.is_main_process else []

    section = recipe.model
    model = run.build_model(lambda: with_sampling_defaults(TextToImage.from_text_encoder(
        clip, section.image_size, section.unet, section.schedule, vae, section.pixel_shift, section.pixel_scale),
        recipe.samples), TextToImage)
    describe(model, run.state)
    evaluate = SampleGrid(run.folder.path, prompts, recipe.samples)
    if recipe.data.latent_cache is not None:
        train_cache, val_cache = latent_caches(run, model, train_set, val_set)
        return run.fit(model, loss_fn=CachedLatentLoss(model, recipe.loss), train_dataset=train_cache,
                       val_dataset=val_cache, evaluate_fn=evaluate)
    return run.fit(model, loss_fn=DenoisingLoss(model, recipe.loss), train_dataset=robust(train_set),
                   val_dataset=robust(val_set), collate_fn=CaptionTokens(model.context_length), evaluate_fn=evaluate,
                   max_bad_fraction=recipe.data.max_bad_fraction)


def check_latent_cache_options(latent: bool, data: DiffusionDataConfig) -> None:
    """data.latent_cache needs latent diffusion (`latent`: the model has a VAE) and one fixed view per image."""
    if not latent:
        raise ConfigError("data.latent_cache needs latent diffusion (model.vae): a pixel model has no latents")
    if data.crop_scale is not None:
        raise ConfigError("data.latent_cache keeps one view per image, so random crops would be frozen: set "
                          "data.crop_scale: null, or leave data.latent_cache out")


def latent_caches(run: RecipeRun, model: TextToImage, train_set, val_set) -> tuple:
    """(train, val or None) LatentCaches in data.latent_cache/{train,val}: built by the main process on the
    accelerator (the others wait, then read them), reused when they match."""
    from ..diffusion.latent_cache import LatentCache

    data = run.recipe.data
    for dataset, spec in ((train_set, data.train), (val_set, data.val)):
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ConfigError(f"data.latent_cache needs finite datasets (a table, a folder or shapes), not the "
                              f"streamed shards of {spec}")
    folder = Path(data.latent_cache).expanduser()
    model.to(run.state.device)
    caches = []
    with run.state.main_process_first():
        for name, dataset, spec in (("train", train_set, data.train), ("val", val_set, data.val)):
            caches.append(None if dataset is None else LatentCache.open_or_build(
                folder / name, model, dataset, spec, progress=run.progress and run.state.is_main_process))
    return tuple(caches)


def with_sampling_defaults(model, samples: SampleGridConfig):
    """`model` (a TextToImage or an UnCLIPDecoder) with the grid's sampler, steps, guidance scale (until an evaluation
    chooses another) and guidance interval as its stored sampling defaults."""
    model.config.sampler, model.config.sampling_steps = samples.sampler, samples.steps
    model.config.guidance_scale = samples.guidance_scale
    model.config.guidance_interval = samples.guidance_interval
    return store_clip_sampling(model, samples)


def store_clip_sampling(model: TextToImage, samples: SampleGridConfig) -> TextToImage:
    """`model` with the grid's CLIP guidance scale, views and reranking (those not None) as its stored defaults."""
    for name in CLIP_SAMPLING:
        if getattr(samples, name) is not None:
            setattr(model.config, name, getattr(samples, name))
    return model


def check_clip_sampling(samples: SampleGridConfig, clip: CLIP, where: str) -> None:
    """ConfigError, before anything is written, for CLIP guidance or reranking asked of a text encoder alone."""
    for name, on in (("clip_guidance_scale", (samples.clip_guidance_scale or 0) > 0),
                     ("clip_rerank", (samples.clip_rerank or 1) > 1)):
        if on and clip.config.vision is None:
            raise ConfigError(f"samples.{name} needs a CLIP with an image tower; {where} is a text encoder alone")


def describe(model: TextToImage, state) -> None:
    """Print what is trained: the UNet's size and conditioning, and the VAE for latent diffusion."""
    unet_parameters = sum(p.numel() for p in model.unet.parameters())
    state.print(f"text2img: UNet {unet_parameters / 1e6:.2f}M parameters on a frozen CLIP text encoder "
                f"(context {model.context_length} tokens x {model.config.unet.context_dim})")
    if model.vae is not None:
        channels, size, _ = model.config.sample_shape
        state.print(f"latent diffusion: the UNet denoises {channels}x{size}x{size} latents of a frozen VAE "
                    f"(scaling factor {model.vae.config.scaling_factor:.4g}) decoded to "
                    f"{model.config.image_size}x{model.config.image_size} images")
