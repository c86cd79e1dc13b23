"""unCLIP decoder recipe: image–caption pairs -> the diffusion UNet conditioned on the images' CLIP image embeddings.

The frozen CLIP (`model.clip`, a CLIP run or model folder) embeds each training image; the UNet learns to
denoise the image given that embedding (and the caption, with `model.text_conditioning`). For classifier-free
guidance the embedding is set to zero `loss.image_embedding_dropout` of the time and the caption replaced by the
empty prompt `loss.caption_dropout` of the time (DALL·E 2 uses 10% and 50%). At each evaluation the CLIP
embeddings of fixed held-out images are decoded: RUN_DIR/samples/step-N.png shows the originals in the first row
and the decodings below (logged in metrics.jsonl as samples/grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.images import make_grid, save_png, to_pil_images
from ..data.robust import BadSampleTracker
from ..diffusion.decoder import DecoderConfig, UnCLIPDecoder
from ..diffusion.schedule import NoiseSchedule
from ..diffusion.unet import UNetConfig
from ..errors import ConfigError
from ..pipelines.unclip import DecoderPipeline
from ..run_folder import RunFolder
from ..training import TrainConfig, Trainer
from ..training.trainer import process_state
from .common import caption_datasets, open_run, robust, write_run_config
from .diffusion import CaptionTokens, DenoisingLoss, DiffusionDataConfig, DiffusionLossConfig, SampleGridConfig
from .unclip import checkpoint_config, held_out_pairs, load_clip


@dataclass
class DecoderModelSection:
    """The frozen CLIP (a CLIP run or model folder), the image size, the UNet, the schedule and the conditioning."""

    clip: str = "runs/clip-shapes"
    image_size: int = 32
    unet: UNetConfig = field(default_factory=UNetConfig)  # context_dim and pooled_dim come from the CLIP
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    embedding_tokens: int = 4
    text_conditioning: bool = True


@dataclass
class DecoderLossConfig(DiffusionLossConfig):
    """The denoising loss with DALL·E 2's two dropouts for classifier-free guidance."""

    caption_dropout: float = 0.5
    image_embedding_dropout: float = 0.1  # this fraction of image embeddings is set to zero

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.image_embedding_dropout <= 1.0:
            raise ValueError(f"image_embedding_dropout must lie in [0, 1], got {self.image_embedding_dropout}")


@dataclass
class DecoderRecipe:
    """configs/decoder-*.yaml: model, data, loss, samples and train sections."""

    model: DecoderModelSection = field(default_factory=DecoderModelSection)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    loss: DecoderLossConfig = field(default_factory=DecoderLossConfig)
    samples: SampleGridConfig = field(default_factory=SampleGridConfig)  # held-out images decoded; no prompts
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        timesteps = self.model.schedule.num_train_timesteps
        if self.samples.steps > timesteps:
            raise ValueError(f"samples.steps ({self.samples.steps}) exceeds the {timesteps} training timesteps")
        if self.samples.prompts is not None:
            raise ValueError("samples.prompts is not used by the decoder: it decodes held-out images' embeddings")


class DecoderLoss(DenoisingLoss):
    """DenoisingLoss whose model also gets the clean images' CLIP embeddings, zeroed at random in training."""

    def __init__(self, decoder: UnCLIPDecoder, config: DecoderLossConfig, tracker: BadSampleTracker, seed: int):
        super().__init__(decoder.schedule, config, decoder.context_length, tracker, seed)
        self.encode_image = decoder.encode_image
        self.text_conditioning = decoder.config.text_conditioning

    def model_inputs(self, model, batch: dict, tokens: torch.Tensor) -> tuple:
        """(image embeddings, tokens or None without text conditioning)."""
        embedding = self.encode_image(batch["images"])  # (batch, embed_dim), unit length
        if model.training:
            dropped = torch.rand(len(embedding), device=embedding.device) < self.config.image_embedding_dropout
            embedding = embedding.masked_fill(dropped[:, None], 0.0)
        return embedding, (tokens if self.text_conditioning else None)


class ReconstructionGrid:
    """The Trainer's evaluate_fn: reseed the validation draws, then (main process) decode the fixed held-out images'
    embeddings and save originals + decodings as RUN_DIR/samples/step-N.png."""

    def __init__(self, loss_fn: DenoisingLoss, run_dir: Path, images: torch.Tensor, captions: list[str],
                 config: SampleGridConfig):
        self.loss_fn, self.run_dir, self.images, self.captions, self.config = loss_fn, run_dir, images, captions, config

    def __call__(self, model: UnCLIPDecoder, step: int) -> dict:
        self.loss_fn.restart_validation()
        if not self.captions or not process_state().is_main_process:
            return {}
        config, device = self.config, next(model.parameters()).device
        embeddings = model.encode_image(self.images.to(device))
        decoded = DecoderPipeline(model)(embeddings, self.captions, steps=config.steps,
                                         guidance_scale=config.guidance_scale, seed=config.seed, progress=False)
        path = self.run_dir / "samples" / f"step-{step}.png"
        save_png(make_grid(to_pil_images(self.images) + decoded, columns=len(decoded)), path)
        return {"samples/grid": str(path.relative_to(self.run_dir))}


def new_model(section: DecoderModelSection) -> UnCLIPDecoder:
    """A random UNet on a copy of the frozen CLIP in section.clip; an inconsistent section is a ConfigError."""
    clip = load_clip(section.clip)
    for name in ("context_dim", "pooled_dim"):
        if getattr(section.unet, name) is not None:
            raise ConfigError(f"model.unet.{name} is set by the CLIP; leave it out")
    try:
        return UnCLIPDecoder.from_clip(clip, section.image_size, section.unet, section.schedule,
                                       embedding_tokens=section.embedding_tokens,
                                       text_conditioning=section.text_conditioning)
    except ValueError as error:
        raise ConfigError(f"config section 'model': {error}") from None


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False) -> UnCLIPDecoder:
    """Train an unCLIP decoder as `mmgen train decoder` does; returns the (EMA) model."""
    from accelerate.utils import set_seed

    run_dir = Path(run_dir)
    recipe, state = open_run(DecoderRecipe, config_path, overrides, run_dir, resume)
    checkpoint = RunFolder(run_dir).latest() if resume else None
    set_seed(recipe.train.seed)
    # a checkpoint holds the CLIP: resuming does not need the CLIP folder
    if checkpoint is None:
        model = new_model(recipe.model)
    else:
        model = UnCLIPDecoder(checkpoint_config(checkpoint, DecoderConfig))
    train_set, val_set = caption_datasets(
        recipe.data, image_size=model.config.image_size, normalize="minus_one_to_one", seed=recipe.train.seed,
        rank=state.process_index, world_size=state.num_processes, num_workers=recipe.train.num_workers,
        progress=recipe.train.progress and state.is_main_process, shapes_options=recipe.data.shapes_options())
    images, captions = torch.empty(0), []
    if state.is_main_process:
        if recipe.samples.count:
            images, captions = held_out_pairs(val_set or train_set, recipe.samples.count)
            if not captions:
                raise ConfigError("no usable image-caption pair found for the sample grid; set samples.count=0")
        write_run_config(run_dir, recipe)
    state.wait_for_everyone()

    unet_parameters = sum(p.numel() for p in model.unet.parameters())
    text = "its caption's CLIP token states and " if model.config.text_conditioning else ""
    state.print(f"decoder: UNet {unet_parameters / 1e6:.2f}M parameters conditioned on {text}a CLIP image "
                f"embedding ({model.embed_dim} wide, {model.config.embedding_tokens} context tokens)")
    tracker = BadSampleTracker(recipe.data.max_bad_fraction)
    loss_fn = DecoderLoss(model, recipe.loss, tracker, recipe.train.seed)
    trainer = Trainer(
        model,
        recipe.train,
        run_dir,
        loss_fn=loss_fn,
        train_dataset=robust(train_set),
        val_dataset=robust(val_set) if val_set is not None else None,
        collate_fn=CaptionTokens(model.context_length),
        evaluate_fn=ReconstructionGrid(loss_fn, run_dir, images, captions, recipe.samples),
    )
    return trainer.fit(resume=resume)
