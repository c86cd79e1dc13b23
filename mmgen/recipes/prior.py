"""unCLIP prior recipe: image–caption pairs -> a diffusion prior from CLIP text to CLIP image embeddings.

The frozen CLIP (`model.clip`, a CLIP run or model folder) gives both sides of each pair: the caption's tokens are
the condition, the image's scaled CLIP embedding is the clean sample x0. Its weights are copied into the prior, so
the run folder needs nothing else afterwards. Captions are replaced by the empty prompt `loss.caption_dropout` of the
time, for classifier-free guidance. Each evaluation samples embeddings for a fixed batch of held-out captions and
logs, as DALLE2-pytorch's prior.md does, their mean cosine similarity to the true image embeddings (val/cosine), to
the captions' text embeddings (val/cosine_text) and to an unrelated pair's image embedding (val/cosine_unrelated,
which must stay low), beside the captions' text embeddings' similarity to the true image embeddings
(val/cosine_text_baseline), which the prior has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.robust import robust
from ..diffusion.objective import DiffusionLossConfig, PriorLoss
from ..diffusion.prior import (
    DiffusionPrior,
    PriorTransformerConfig,
    default_prior_schedule,
)
from ..diffusion.schedule import NoiseSchedule
from ..diffusion.text2img import tokenize_prompts
from ..errors import UserError
from ..pipelines.unclip import PriorPipeline
from ..training import TrainConfig
from ..training.trainer import process_state
from .common import RecipeRun
from .diffusion import CaptionTokens, DiffusionDataConfig
from .unclip import evaluation_pairs, load_clip


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
    """The prior measured as DALLE2-pytorch's prior.md does, on pairs of `images` (CLIP-normalised, at the CLIP's
    size) and their `captions`; mean cosine similarities of the prior's sampled image embedding for each caption
    - "cosine": to the true image embedding of its image (higher is better);
    - "cosine_text": to the caption's own text embedding;
    - "cosine_unrelated": to the true image embedding of the next pair's image, pairs with the same caption left out
      (must stay low: a prior that ignores its caption scores as high here as in "cosine"; absent when no two
      captions differ);
    and "cosine_text_baseline": the caption's text embedding to the true image embedding (what a decoder would get
    without a prior; the prior has to beat it)."""
    if len(images) != len(captions) or not captions:
        raise UserError(f"need as many images as captions, at least one; got {len(images)} and {len(captions)}")
    pipeline = PriorPipeline(prior)
    device = next(prior.parameters()).device
    sampled, true, text = [], [], []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        true.append(prior.clip.encode_image(images[start : start + batch_size].to(device)))
        sampled.append(pipeline(chunk, steps=steps, guidance_scale=guidance_scale, seed=seed + start,
                                progress=progress))
        text.append(prior.encode_text(tokenize_prompts(chunk, prior.context_length).to(device)).embedding)
    sampled, true, text = torch.cat(sampled), torch.cat(true), torch.cat(text)  # (pairs, embed_dim), unit length
    similarity = {"cosine": (sampled * true).sum(-1).mean().item(),
                  "cosine_text": (sampled * text).sum(-1).mean().item(),
                  "cosine_text_baseline": (text * true).sum(-1).mean().item()}
    unrelated = torch.tensor([caption != captions[index - 1] for index, caption in enumerate(captions)])
    if unrelated.any():  # pair i against the image of pair i - 1
        cosines = (sampled * true.roll(1, dims=0)).sum(-1)
        similarity["cosine_unrelated"] = cosines[unrelated.to(cosines.device)].mean().item()
    return similarity


class SimilarityEvaluation:
    """The Trainer's evaluate_fn: (main process) val/cosine on the fixed pairs."""

    def __init__(self, images: torch.Tensor, captions: list[str], config: PriorSamplesConfig):
        self.images, self.captions, self.config = images, captions, config

    def __call__(self, model: DiffusionPrior, step: int) -> dict:
        if not self.captions or not process_state().is_main_process:
            return {}
        config = self.config
        similarity = embedding_similarity(model, self.images, self.captions, steps=config.steps,
                                          guidance_scale=config.guidance_scale, seed=config.seed)
        return {f"val/{name}": value for name, value in similarity.items()}


def new_model(section: PriorModelSection) -> DiffusionPrior:
    """A random prior on a copy of the frozen CLIP in section.clip."""
    return DiffusionPrior.from_clip(load_clip(section.clip), section.transformer, section.schedule)


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False) -> DiffusionPrior:
    """Train a diffusion prior as `mmgen train prior` does; returns the (EMA) model."""
    run = RecipeRun.open(PriorRecipe, config_path, overrides, run_dir, resume)
    recipe = run.recipe
    # a checkpoint holds the CLIP: resuming does not need the CLIP folder
    model = run.build_model(lambda: new_model(recipe.model), DiffusionPrior)
    train_set, val_set = run.caption_datasets(model.config.clip.vision.image_size, "clip", recipe.data.shapes_options())
    images, captions = evaluation_pairs(run, train_set, val_set, recipe.samples.count)

    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.state.print(f"prior: transformer {parameters / 1e6:.2f}M parameters on a frozen CLIP "
                    f"(embed_dim {model.embed_dim}, {model.context_length} text tokens, "
                    f"predicting {model.schedule.prediction_type})")
    return run.fit(model, loss_fn=PriorLoss(model, recipe.loss), train_dataset=robust(train_set),
                   val_dataset=robust(val_set), collate_fn=CaptionTokens(model.context_length),
                   evaluate_fn=SimilarityEvaluation(images, captions, recipe.samples),
                   max_bad_fraction=recipe.data.max_bad_fraction)
