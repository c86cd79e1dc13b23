"""Decode a finite caption dataset once and keep it in memory (the shapes set renders in seconds, then costs nothing).

Training sets use CachedCaptions: 8-bit images a little above the model's size, the dataset's own transform (random
crop, normalisation) drawn per item, bad samples kept in their places. InMemoryCaptions holds transformed tensors
and drops bad samples: for fixed evaluation sets.
"""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from tqdm.auto import tqdm

from ..errors import UserError
from .images import shrink
from .robust import MAX_EXAMPLES, collate_captions

# the cached images' shorter side over the model's image size: ImageNet's "resize to 256, crop 224"
CACHE_OVERSIZE = 8 / 7


class InMemoryCaptions(Dataset):
    """All items of `dataset` as one image tensor + captions (+ labels), transformed once: for evaluation sets
    (a random crop would be frozen; CachedCaptions is the training cache). Bad samples are dropped, counted
    (`skipped`) and named in a warning on stderr."""

    def __init__(self, dataset: Dataset, *, num_workers: int = 0, batch_size: int = 256, progress: bool = True,
                 description: str = "caching images"):
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_captions)
        images, captions, labels, examples, self.skipped = [], [], [], [], 0
        for batch in tqdm(loader, desc=description, disable=not progress, leave=False):
            images.append(batch["images"])
            captions += batch["captions"]
            labels.append(batch.get("labels"))
            self.skipped += batch["skipped"]
            examples += batch["skipped_examples"][: MAX_EXAMPLES - len(examples)]
        if not captions:
            raise UserError(f"no usable samples in the data ({self.skipped} unreadable)")
        if self.skipped:
            print(f"warning: {description}: {self.skipped} of {self.skipped + len(captions)} samples are unreadable "
                  f"and left out, e.g. {', '.join(examples)}", file=sys.stderr)
        self.images = torch.cat([chunk for chunk in images if chunk.numel()])
        self.captions = captions
        self.labels = torch.cat(labels) if all(chunk is not None for chunk in labels) else None
        if hasattr(dataset, "classes"):
            self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        item = {"image": self.images[index], "caption": self.captions[index]}
        if self.labels is not None:
            item["label"] = int(self.labels[index])
        return item


class _DecodeForCache:
    """The transform a dataset decodes with while caching: PIL RGB -> (3, H, W) uint8, shorter side at most
    `shorter_side` (see images.shrink)."""

    def __init__(self, shorter_side: int):
        self.shorter_side = shorter_side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(shrink(image, self.shorter_side), dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def _pack(items: list) -> dict:
    """A batch of decoded items as one flat uint8 tensor (sent once from a worker) + per-item sizes and texts;
    a bad item (BadSample or None) keeps its place."""
    good = [item for item in items if isinstance(item, dict)]
    return {
        "pixels": torch.cat([item["image"].reshape(-1) for item in good]) if good else torch.empty(0, dtype=torch.uint8),
        "items": [(tuple(item["image"].shape[1:]), item["caption"], item.get("label")) if isinstance(item, dict)
                  else item for item in items],
    }


class CachedCaptions(Dataset):
    """A finite caption dataset decoded once into memory as 8-bit RGB, its shorter side scaled down to
    ceil(CACHE_OVERSIZE * image_size) (aspect ratio kept; smaller images stay as they are).

    Item i is `dataset.transform` (random resized crop, normalisation ...) applied to the cached image (as a
    uint8 tensor: torchvision's v2 transforms take one for a PIL image), drawn anew at every read from torch's RNG
    as without the cache, so each epoch sees new crops; where the transform is not random and the image is no
    larger than that size (the shapes set), items equal the dataset's bit for bit. A bad sample stays a BadSample
    at its index, so ReplaceBadSamples and BadSampleTracker count it as without the cache.
    Memory: 3 bytes a pixel, 4 * (7/8)^2 ~ 3x less than float32 images at the model's size for square images (less
    for wide ones: the whole picture is kept), 4x for shapes."""

    def __init__(self, dataset: Dataset, image_size: int, *, num_workers: int = 0, batch_size: int = 256,
                 progress: bool = True, description: str = "caching images"):
        if not hasattr(dataset, "transform"):
            raise TypeError(f"CachedCaptions needs a dataset with a `transform` attribute, got {type(dataset).__name__}")
        self.transform = dataset.transform
        decoding = copy.copy(dataset)  # the same dataset, decoding to uint8 instead of transforming
        decoding.transform = _DecodeForCache(math.ceil(CACHE_OVERSIZE * image_size))
        loader = DataLoader(decoding, batch_size=batch_size, num_workers=num_workers, collate_fn=_pack,
                            generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
        chunks, sizes, self.captions, labels, self.bad = [], [], [], [], {}
        for batch in tqdm(loader, desc=description, disable=not progress, leave=False):
            chunks.append(batch["pixels"])
            for entry in batch["items"]:
                if isinstance(entry, tuple):
                    size, caption, label = entry
                else:  # a bad sample: kept where it was
                    self.bad[len(sizes)] = entry
                    size, caption, label = (0, 0), None, -1
                sizes.append(size)
                self.captions.append(caption)
                labels.append(label)
        if len(self.bad) == len(sizes):
            raise UserError(f"no usable samples in the data ({len(self.bad)} unreadable)")
        self.pixels = torch.cat(chunks)  # every good image's (3, H, W) bytes, one after the other
        # numpy, not tensors: every read indexes them, and a numpy index costs far less than a tensor's
        self.sizes = np.array(sizes, dtype=np.int64).reshape(-1, 2)  # (items, 2): height, width; 0 for a bad sample
        self.offsets = np.concatenate([[0], np.cumsum(3 * self.sizes[:, 0] * self.sizes[:, 1])])
        self.labels = np.array(labels, dtype=np.int64) if None not in labels else None  # -1 for a bad sample
        if hasattr(dataset, "classes"):
            self.classes = dataset.classes

    @property
    def skipped(self) -> int:
        """How many of the dataset's samples are bad (each is counted again whenever training draws it)."""
        return len(self.bad)

    def cached_image(self, index: int) -> tv_tensors.Image:
        """Cached image `index`, (3, H, W) uint8 (a copy: a transform may not write into the cache)."""
        height, width = self.sizes[index]
        pixels = self.pixels[self.offsets[index] : self.offsets[index + 1]].view(3, height, width)
        return pixels.clone().as_subclass(tv_tensors.Image)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached items")
        if index in self.bad:
            return self.bad[index]
        item = {"image": self.transform(self.cached_image(index)), "caption": self.captions[index]}
        if self.labels is not None:
            item["label"] = int(self.labels[index])
        return item
