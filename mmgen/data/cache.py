"""Decode a finite caption dataset once and keep it in memory (the shapes set renders in seconds, then costs nothing)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import UserError
from .robust import collate_captions


class InMemoryCaptions(Dataset):
    """All items of `dataset` as one image tensor + captions (+ labels); bad samples are dropped and counted."""

    def __init__(self, dataset: Dataset, *, num_workers: int = 0, batch_size: int = 256, progress: bool = True,
                 description: str = "caching images"):
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_captions)
        images, captions, labels, self.skipped = [], [], [], 0
        for batch in tqdm(loader, desc=description, disable=not progress, leave=False):
            images.append(batch["images"])
            captions += batch["captions"]
            labels.append(batch.get("labels"))
            self.skipped += batch["skipped"]
        if not captions:
            raise UserError(f"no usable samples in the data ({self.skipped} unreadable)")
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
