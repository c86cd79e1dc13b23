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
from ..data.robust import robust
from ..diffusion.decoder import UnCLIPDecoder
from ..diffusion.objective import DecoderLoss, DecoderLossConfig
from ..diffusion.schedule import NoiseSchedule
from ..diffusion.text2img import CLIP_SAMPLING
from ..diffusion.unet import UNetConfig
from ..errors import ConfigError
from ..pipelines.unclip import DecoderPipeline
from ..training import TrainConfig
from ..training.trainer import process_state
from .common import RecipeRun
from .diffusion import (
    CaptionTokens,
    DiffusionDataConfig,
    SampleGridConfig,
    store_best_guidance,
    with_sampling_defaults,
)
from .unclip import evaluation_pairs, load_clip


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
        for name in CLIP_SAMPLING:
            if getattr(self.samples, name) is not None:
                raise ValueError(f"samples.{name} is for text-to-image models, not the unCLIP decoder")
        if self.samples.prompts is not None:
            raise ValueError("samples.prompts is not used by the decoder: it decodes held-out images' embeddings")
        if self.samples.guidance_choices is not None and len(self.samples.guidance_choices) != len(
                set(self.samples.guidance_choices)):
            raise ValueError(f"samples.guidance_choices repeats a scale: {self.samples.guidance_choices}")


class ReconstructionGrid:
    """The Trainer's evaluate_fn: (main process) decode the fixed held-out images' embeddings and save originals +
    decodings as RUN_DIR/samples/step-N.png, with the grid's sampler, steps, guidance and guidance interval (the
    model's stored ones).

    With samples.guidance_choices, the embeddings are first decoded at each scale; the scale whose decodings' CLIP
    image embeddings lie closest (mean cosine) to the embeddings they were decoded from becomes the model's stored
    guidance_scale, and each scale's cosine is logged as samples/clip_cosine@G."""

    def __init__(self, run_dir: Path, images: torch.Tensor, captions: list[str], config: SampleGridConfig):
        self.run_dir, self.images, self.captions, self.config = run_dir, images, captions, config

    def __call__(self, model: UnCLIPDecoder, step: int) -> dict:
        if not self.captions or not process_state().is_main_process:
            return {}
        config, device, metrics = self.config, next(model.parameters()).device, {}
        if config.guidance_interval is not None:  # the grid's, also when a resumed run changed it
            model.config.guidance_interval = config.guidance_interval
        embeddings = model.encode_image(self.images.to(device))
        if config.guidance_choices:
            metrics = self.choose_guidance(model, embeddings)
        decoded = self.decode(model, embeddings, model.config.guidance_scale)
        path = self.run_dir / "samples" / f"step-{step}.png"
        save_png(make_grid(to_pil_images(self.images) + decoded, columns=len(decoded)), path)
        return {**metrics, "samples/grid": str(path.relative_to(self.run_dir))}

    def decode(self, model: UnCLIPDecoder, embeddings: torch.Tensor, guidance_scale: float) -> list:
        config = self.config
        return DecoderPipeline(model)(embeddings, self.captions, sampler=config.sampler, steps=config.steps,
                                      guidance_scale=guidance_scale, seed=config.seed, progress=False)

    @torch.no_grad()
    def choose_guidance(self, model: UnCLIPDecoder, embeddings: torch.Tensor) -> dict:
        """Decode at each of guidance_choices; the scale with the highest mean cosine between the decodings' CLIP
        embeddings and `embeddings` (ties: the smallest) becomes model.config.guidance_scale."""
        def cosine(scale: float) -> float:
            decoded = DecoderPipeline(model).image_embeddings(self.decode(model, embeddings, scale))
            return (decoded * embeddings).sum(dim=1).mean().item()

        return store_best_guidance(model, self.config.guidance_choices, cosine, "samples/clip_cosine")


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
    run = RecipeRun.open(DecoderRecipe, config_path, overrides, run_dir, resume)
    recipe = run.recipe
    # a checkpoint holds the CLIP: resuming does not need the CLIP folder
    model = run.build_model(lambda: with_sampling_defaults(new_model(recipe.model), recipe.samples), UnCLIPDecoder)
    train_set, val_set = run.caption_datasets(model.config.image_size, "minus_one_to_one", recipe.data.shapes_options())
    images, captions = evaluation_pairs(run, train_set, val_set, recipe.samples.count)

    unet_parameters = sum(p.numel() for p in model.unet.parameters())
    text = "its caption's CLIP token states and " if model.config.text_conditioning else ""
    run.state.print(f"decoder: UNet {unet_parameters / 1e6:.2f}M parameters conditioned on {text}a CLIP image "
                    f"embedding ({model.embed_dim} wide, {model.config.embedding_tokens} context tokens)")
    return run.fit(model, loss_fn=DecoderLoss(model, recipe.loss), train_dataset=robust(train_set),
                   val_dataset=robust(val_set), collate_fn=CaptionTokens(model.context_length),
                   evaluate_fn=ReconstructionGrid(run.folder.path, images, captions, recipe.samples),
                   max_bad_fraction=recipe.data.max_bad_fraction)
