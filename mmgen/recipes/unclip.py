"""What the unCLIP recipes (`mmgen train prior`, `mmgen train decoder`) share: the frozen CLIP they start from,
the CLIP config of a checkpoint they resume, and a fixed batch of held-out pairs for their evaluations."""

from __future__ import annotations

import itertools

import torch

from ..clip.model import CLIP
from ..config import from_dict
from ..errors import CheckpointError, ConfigError
from ..hub import load_as, read_model_config


def load_clip(path: str) -> CLIP:
    """The CLIP in a run or model folder; anything else is a ConfigError naming model.clip."""
    try:
        return load_as(path, CLIP)
    except CheckpointError as error:
        raise ConfigError(f"model.clip={path}: {error} (it needs a CLIP run or model folder: "
                          "`mmgen train clip` or `mmgen convert open-clip` first)") from None


def checkpoint_config(checkpoint, config_class: type):
    """The model config saved in a checkpoint folder (what a resumed run rebuilds its model from)."""
    return from_dict(config_class, read_model_config(checkpoint)["config"], "config.")


def held_out_pairs(dataset, count: int) -> tuple[torch.Tensor, list[str]]:
    """The images (count, 3, H, W) and captions of the first `count` usable items of a caption dataset."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        items = iter(dataset)
    else:
        items = (dataset[index] for index in range(len(dataset)))
    pairs = [item for item in itertools.islice(items, 4 * count) if isinstance(item, dict)][:count]
    if not pairs:
        return torch.empty(0, 3, 0, 0), []
    return torch.stack([item["image"] for item in pairs]), [item["caption"] for item in pairs]


def evaluation_pairs(run, train_set, val_set, count: int) -> tuple[torch.Tensor, list[str]]:
    """The held-out pairs an unCLIP recipe evaluates on: `count` usable pairs of the val set (else the training set)
    on the main process, none elsewhere or with count 0; none usable is a ConfigError."""
    if not run.state.is_main_process or not count:
        return torch.empty(0), []
    images, captions = held_out_pairs(val_set or train_set, count)
    if not captions:
        raise ConfigError("no usable image-caption pair found for the evaluation samples; set samples.count=0")
    return images, captions
