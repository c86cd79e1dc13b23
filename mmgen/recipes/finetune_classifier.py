"""`mmgen finetune clip-classifier`: a CLIP image tower + a linear head trained on a labelled image folder.

probe: true is a linear probe (the image tower stays frozen, only the head learns); probe: false fine-tunes the
tower with the head. Accuracy is reported on a held-out split (data.val, or a seeded per-class share of data.train).
The result is a model folder of type "clip-classifier" (mmgen.clip.CLIPClassifier), loadable with mmgen.load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Subset

from ..clip.classifier import CLIPClassifier
from ..clip.model import CLIP
from ..clip.zeroshot import topk_accuracy
from ..data.captions import LabelledImageFolder, build_caption_dataset
from ..data.robust import collate_captions, robust
from ..errors import ConfigError, UserError
from ..training import TrainConfig
from ..training.trainer import process_state
from .clip import batched, first_items
from .finetune import FinetuneConfig, adapt, start


@dataclass
class ClassifierData:
    """A labelled image folder (one sub-folder of images per class) and where the held-out images come from."""

    train: str | None = None  # required
    val: str | None = None  # a labelled folder with the same classes; None: hold out val_fraction of train
    val_fraction: float = 0.2  # per class, seeded by train.seed
    crop_scale: tuple[float, float] = (0.9, 1.0)
    templates: list[str] | None = None  # prompts for the zero-shot head (default: mmgen.clip.zeroshot's)
    max_bad_fraction: float = 0.01
    eval_samples: int = 2000  # at most this many held-out images for the accuracy at each evaluation

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.eval_samples < 1:
            raise ValueError(f"eval_samples must be >= 1, got {self.eval_samples}")


@dataclass
class ClassifierRecipe(FinetuneConfig):
    """A clip-classifier config: base (a CLIP), method full, probe, head_init, data and train sections."""

    method: Literal["full", "lora", "qlora"] = "full"
    probe: bool = False  # linear probe: freeze the image tower, train the head only
    head_init: Literal["zeroshot", "random"] = "zeroshot"  # zeroshot: start from CLIP's zero-shot classifier
    data: ClassifierData = field(default_factory=ClassifierData)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.method != "full":
            raise ValueError(f"clip-classifier trains with method full (probe: true for a linear probe), not "
                             f"{self.method!r}: an adapter file would not carry the new head")


def held_out_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded `fraction` of each class (at least one where it has two or more)."""
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for label in sorted(set(labels)):
        members = [index for index, value in enumerate(labels) if value == label]
        members = [members[i] for i in rng.permutation(len(members))]
        count = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        held_out += members[:count]
        train += members[count:]
    return sorted(train), [held_out[i] for i in rng.permutation(len(held_out))]


def classifier_datasets(data: ClassifierData, image_size: int, seed: int):
    """(train, held-out, class names) from the labelled folder(s)."""
    if data.train is None:
        raise ConfigError("data.train is required: a labelled image folder (one sub-folder of images per class)")

    def folder(spec: str, train: bool) -> LabelledImageFolder:
        dataset = build_caption_dataset(spec, image_size=image_size, train=train, normalize="clip",
                                        crop_scale=data.crop_scale, seed=seed)
        if not isinstance(dataset, LabelledImageFolder):
            raise ConfigError(f"{spec!r} is not a labelled image folder (one sub-folder of images per class)")
        return dataset

    train_set = folder(data.train, train=True)
    if data.val is not None:
        val_set = folder(data.val, train=False)
        if val_set.classes != train_set.classes:
            raise UserError(f"data.val {data.val} has classes {val_set.classes}, data.train has {train_set.classes}")
        return train_set, val_set, train_set.classes
    train_indices, val_indices = held_out_split(train_set.labels, data.val_fraction, seed)
    if not val_indices:
        raise UserError(f"{data.train}: too few images per class to hold any out; add images or set data.val")
    return Subset(train_set, train_indices), Subset(folder(data.train, train=False), val_indices), train_set.classes


def classification_loss(model, batch: dict):
    """loss_fn: cross-entropy of the class logits (and the batch's accuracy)."""
    logits = model(batch["images"])
    accuracy = (logits.argmax(dim=-1) == batch["labels"]).float().mean()
    return F.cross_entropy(logits.float(), batch["labels"]), {"train/accuracy": accuracy}


class HeldOutAccuracy:
    """evaluate_fn: top-1 (and top-5 with more than five classes) accuracy on the held-out images (main process)."""

    def __init__(self, dataset, limit: int):
        self.items = first_items(dataset, limit, "held-out images")

    @torch.no_grad()
    def __call__(self, model: CLIPClassifier, step: int | None = None) -> dict:
        if not process_state().is_main_process:
            return {}
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        logits = batched(model, self.items.images, device)
        model.train(was_training)
        accuracy = topk_accuracy(logits, self.items.labels, ks=(1, 5))
        metrics = {"val/accuracy": accuracy[1]}
        if logits.shape[1] > 5:
            metrics["val/top5"] = accuracy[5]
        return metrics


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False,
          base: str | None = None) -> CLIPClassifier:
    """Train a CLIP classifier as `mmgen finetune clip-classifier` does; returns it."""
    run, clip, _ = start(ClassifierRecipe, CLIP, config_path, run_dir, overrides, resume, base)
    recipe = run.recipe
    train_set, val_set, classes = classifier_datasets(recipe.data, clip.config.vision.image_size, recipe.train.seed)
    evaluation = HeldOutAccuracy(val_set, recipe.data.eval_samples) if run.state.is_main_process else None

    model = run.build_model(lambda: CLIPClassifier.from_clip(clip, classes, recipe.head_init, recipe.data.templates))
    if recipe.probe:
        model.vision.requires_grad_(False)
    run.state.print(f"{len(classes)} classes, {len(train_set)} training images, {len(val_set)} held out"
                    + (" (linear probe)" if recipe.probe else ""))
    save_fn, load_fn = adapt(model, recipe)
    return run.fit(model, loss_fn=classification_loss, train_dataset=robust(train_set), val_dataset=robust(val_set),
                   collate_fn=collate_captions, evaluate_fn=evaluation, save_fn=save_fn, load_fn=load_fn,
                   max_bad_fraction=recipe.data.max_bad_fraction)
