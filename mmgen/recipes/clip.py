"""CLIP recipe: image–caption data -> CLIP -> contrastive loss, with held-out zero-shot and retrieval metrics."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..clip.model import CLIP, CLIPConfig
from ..clip.objective import ContrastiveObjective
from ..clip.retrieval import recall_at_k
from ..clip.tokenizer import CLIPTokenizer
from ..clip.towers import TowerTraining, apply_tower_training, trainable_summary
from ..clip.zeroshot import topk_accuracy, zero_shot_classifier
from ..data import shapes
from ..data.cache import InMemoryCaptions
from ..data.captions import build_caption_dataset
from ..data.groups import GroupedItems
from ..data.robust import collate_captions, robust
from ..errors import ConfigError
from ..training import TrainConfig
from ..training.trainer import process_state
from .common import RecipeRun, caption_datasets

EVAL_SEED = 0  # the shapes images of zero-shot evaluation (seed of the val split), independent of train.seed

# prompt ensemble for shapes zero-shot: a class's embedding is the mean over every caption form that names its colour
# and shape, with or without size and position ("a red circle", "a small red circle at the top left", ...), the forms
# training captions take, the way CLIP's zero-shot averages over prompt templates
SHAPES_TEMPLATES = tuple(" ".join(["a", *[size] * bool(size), "{}", *[shapes.position_phrase(p)] * bool(p)])
                         for size in ("", *shapes.SIZES) for p in ("", *shapes.POSITIONS))


@dataclass
class CLIPDataConfig:
    """Where the image–caption pairs come from (see mmgen.data.captions.build_caption_dataset for the forms)."""

    train: str = "shapes"
    val: str | None = "shapes:val"
    columns: tuple[str, str] = ("image", "caption")
    templates: list[str] | None = None  # prompt templates turning a labelled folder's class names into captions
    crop_scale: tuple[float, float] = (0.9, 1.0)
    max_bad_fraction: float = 0.01
    cache: bool = False  # decode the (finite) training set once and keep it in memory
    # shards whose samples have several captions (.txt lines, a .json list): training draws one per sample, seeded
    # ("random"), takes the first, or takes them "all" (up to max_captions_per_image, the first ones) as positives of
    # their image in the contrastive loss (mmgen.clip.loss); evaluation always takes the first
    captions_per_image: Literal["random", "first", "all"] = "random"
    max_captions_per_image: int = 5
    hard_negatives: int = 1  # shapes only: batches of groups of N images that differ only in shape
    # "shapes" (held-out shape×colour classes; "shapes:extra=heart" adds an extra shape's) or a labelled image folder
    zeroshot: str | None = "shapes"
    zeroshot_templates: list[str] | None = None  # default: shapes' or mmgen.clip.zeroshot.DEFAULT_TEMPLATES
    retrieval: str | None = "shapes:val"  # captioned data for image<->text recall (captions deduplicated)
    eval_samples: int = 1000  # at most this many images for zero-shot and retrieval at each evaluation

    def __post_init__(self):
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")
        if self.eval_samples < 1:
            raise ValueError(f"eval_samples must be >= 1, got {self.eval_samples}")
        if self.max_captions_per_image < 1:
            raise ValueError(f"max_captions_per_image must be >= 1, got {self.max_captions_per_image}")
        if self.hard_negatives > 1 and not self.train.startswith("shapes"):
            raise ValueError("hard_negatives needs data.train=shapes (other data has no groups to keep together)")


@dataclass
class CLIPRecipe:
    """configs/clip-*.yaml: model, data, loss, accumulation, towers and train sections."""

    model: CLIPConfig = field(default_factory=CLIPConfig)
    data: CLIPDataConfig = field(default_factory=CLIPDataConfig)
    loss: Literal["infonce", "siglip"] = "infonce"
    # with train.grad_accum_steps > 1: one contrastive batch of all micro-batches, or one per micro-batch
    accumulation: Literal["cached-features", "micro-batches"] = "cached-features"
    towers: TowerTraining = field(default_factory=TowerTraining)
    train: TrainConfig = field(default_factory=TrainConfig)


def contrastive_objective(recipe, model: CLIP, state) -> ContrastiveObjective:
    """Apply the recipe's tower options to `model`, say what trains and which objective runs; the objective."""
    apply_tower_training(model, recipe.towers)
    if recipe.towers.locks:
        state.print(f"locked towers: {trainable_summary(model)}")
    steps, batch = recipe.train.grad_accum_steps, recipe.train.batch_size
    if recipe.data.captions_per_image == "all":
        state.print(f"captions_per_image=all: up to {recipe.data.max_captions_per_image} captions per image, each a "
                    f"positive of its image in the {recipe.loss} loss")
    if steps > 1:
        state.print(f"accumulation={recipe.accumulation}: " + (
            f"{steps} micro-batches of {batch} are one contrastive batch of {steps * batch} per process "
            "(features cached)" if recipe.accumulation == "cached-features" else
            f"{steps} separate contrastive problems of {batch} per step"))
    return ContrastiveObjective(recipe.loss, recipe.accumulation)


class TokenizingCollate:
    """collate_captions + CLIP tokens for the captions (runs in DataLoader workers).

    With `max_captions` (data.captions_per_image: all) the tokens are every image's captions (at most `max_captions`,
    the first ones) one after the other, and "caption_mask" (batch, max_captions) says which slots hold one: the
    layout mmgen.clip.loss takes. An item without several captions has one."""

    def __init__(self, context_length: int, max_captions: int | None = None):
        self.tokenizer = CLIPTokenizer(context_length)
        self.max_captions = max_captions

    def __call__(self, items: list) -> dict:
        batch = collate_captions(items)
        texts = batch["captions"]
        if self.max_captions is not None:
            per_image = [captions[: self.max_captions]
                         for captions in batch.pop("all_captions", None) or [[text] for text in texts]]
            slots = torch.arange(self.max_captions)
            batch["caption_mask"] = torch.stack([slots < len(captions) for captions in per_image]) if per_image \
                else torch.zeros(0, self.max_captions, dtype=torch.bool)  # (batch, max_captions)
            texts = [text for captions in per_image for text in captions]
        batch["tokens"] = self.tokenizer(texts) if texts else torch.zeros(0, 1, dtype=torch.long)
        return batch


def caption_collate(data: CLIPDataConfig, context_length: int) -> TokenizingCollate:
    """The collate of a CLIP recipe's batches: one caption per image, or all of them (data.captions_per_image)."""
    return TokenizingCollate(context_length, data.max_captions_per_image if data.captions_per_image == "all" else None)


def build_datasets(recipe: CLIPRecipe, rank: int = 0, world_size: int = 1, progress: bool = True):
    """(train, val) datasets whose bad samples are replaced (map-style) or skipped (streams) and counted."""
    data = recipe.data
    train_set, val_set = caption_datasets(
        data, image_size=recipe.model.vision.image_size, normalize="clip", seed=recipe.train.seed, rank=rank,
        world_size=world_size, num_workers=recipe.train.num_workers, progress=progress,
        shapes_options={"group_size": data.hard_negatives})
    train_set = robust(train_set)
    if data.hard_negatives > 1:
        train_set = GroupedItems(train_set, data.hard_negatives)
    return train_set, robust(val_set) if val_set is not None else None


class _FirstItems(torch.utils.data.IterableDataset):
    def __init__(self, dataset, limit: int):
        self.dataset, self.limit = dataset, limit

    def __iter__(self):
        return itertools.islice(iter(self.dataset), self.limit)


def first_items(dataset, limit: int, description: str) -> InMemoryCaptions:
    """The first `limit` usable items, decoded into memory."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset = _FirstItems(dataset, limit)
    elif len(dataset) > limit:
        dataset = torch.utils.data.Subset(dataset, range(limit))
    return InMemoryCaptions(dataset, progress=False, description=description)


class HeldOutEvaluation:
    """Zero-shot top-1/top-5 and image<->text recall@k on held-out data, computed on the main process."""

    def __init__(self, recipe: CLIPRecipe):
        data, size = recipe.data, recipe.model.vision.image_size
        self.tokenizer = CLIPTokenizer(recipe.model.text.context_length)
        self.zeroshot = self.retrieval = None
        if data.zeroshot:
            if data.zeroshot == "shapes" or data.zeroshot.startswith("shapes:"):
                # the held-out images are the same whatever the training seed, so that `mmgen eval clip` and every
                # run's logged evaluation measure the same images
                dataset = build_caption_dataset(data.zeroshot, split="val", image_size=size, train=False,
                                                seed=EVAL_SEED)
                class_names, templates = dataset.class_names(), SHAPES_TEMPLATES
                first_new = len(shapes.class_names())  # labels from here on belong to extra shapes
            else:
                dataset = build_caption_dataset(data.zeroshot, image_size=size, train=False)
                if not hasattr(dataset, "classes"):
                    raise ConfigError(f"data.zeroshot={data.zeroshot!r} must be 'shapes' or a labelled image folder")
                class_names, templates, first_new = dataset.classes, None, None
            templates = data.zeroshot_templates or templates
            self.zeroshot = (first_items(dataset, data.eval_samples, "zero-shot images"), class_names, templates,
                             first_new)
        if data.retrieval:
            dataset = build_caption_dataset(data.retrieval, split="val", image_size=size, train=False, seed=EVAL_SEED)
            items = first_items(dataset, data.eval_samples * 4, "retrieval images")
            unique = {}
            for index, text in enumerate(items.captions):  # one image per caption: recall is then well defined
                unique.setdefault(text, index)
            keep = list(unique.values())[: data.eval_samples]
            self.retrieval = (items.images[keep], [items.captions[i] for i in keep])

    @torch.no_grad()
    def __call__(self, model: CLIP, step: int | None = None) -> dict:
        from ..clip.zeroshot import DEFAULT_TEMPLATES

        if not process_state().is_main_process:
            return {}
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        metrics = {}
        if self.zeroshot is not None:
            items, class_names, templates, first_new = self.zeroshot
            classifier = zero_shot_classifier(model, self.tokenizer, class_names, templates or DEFAULT_TEMPLATES)
            scores = batched(model.encode_image, items.images, device) @ classifier.T
            accuracy = topk_accuracy(scores, items.labels, ks=(1, 5))
            metrics.update({"zeroshot/top1": accuracy[1], "zeroshot/top5": accuracy[5]})
            if first_new is not None and (items.labels >= first_new).any():  # top-1 on the extra shapes' images
                new = items.labels >= first_new
                metrics["zeroshot/new_top1"] = topk_accuracy(scores[new], items.labels[new], ks=(1,))[1]
        if self.retrieval is not None:
            images, captions = self.retrieval
            image_features = batched(model.encode_image, images, device)
            text_features = batched(model.encode_text, self.tokenizer(captions), device)
            metrics.update(recall_at_k(image_features, text_features))
        model.train(was_training)
        return metrics


def batched(encode, inputs: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """`encode` applied to `inputs` in chunks of `batch_size` moved to `device` (the model's), concatenated."""
    return torch.cat([encode(inputs[start : start + batch_size].to(device))
                      for start in range(0, len(inputs), batch_size)])


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False) -> CLIP:
    """Train CLIP as `mmgen train clip` does; returns the model."""
    run = RecipeRun.open(CLIPRecipe, config_path, overrides, run_dir, resume)
    recipe = run.recipe
    train_set, val_set = build_datasets(recipe, run.state.process_index, run.state.num_processes, run.progress)
    evaluation = HeldOutEvaluation(recipe) if run.state.is_main_process else None

    model = run.build_model(lambda: CLIP(recipe.model))
    run.state.print(f"CLIP: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {recipe.loss} loss")
    objective = contrastive_objective(recipe, model, run.state)
    return run.fit(model, loss_fn=objective, train_dataset=train_set, val_dataset=val_set,
                   collate_fn=caption_collate(recipe.data, recipe.model.text.context_length), evaluate_fn=evaluation,
                   max_bad_fraction=recipe.data.max_bad_fraction)
