"""Bad data is skipped, not fatal: unusable samples become BadSample markers that the collate drops and counts,
and a BadSampleTracker stops training with one clear line when too many of them turn up."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, UserError

MAX_EXAMPLES = 3  # bad samples named per batch and in messages


@dataclass(frozen=True)
class BadSample:
    """A sample that cannot be used: where it came from and why (what a dataset returns instead of an item)."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source} ({self.reason})"


def _failure_reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "missing"
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    if isinstance(error, Image.DecompressionBombError):
        return "too many pixels"
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return "truncated" if "truncated" in message else f"unreadable: {message[:80]}"


def load_sample(image_source, caption, transform: Callable, *, source: str, label: int | None = None):
    """{"image": transform(RGB image), "caption": stripped caption[, "label"]}, or a BadSample saying what is wrong.

    `image_source` is a path or a binary file object; `source` names the sample in messages."""
    # imported here, not at the top: the Trainer imports this module, and a text run needs no torchvision (~1 s)
    from .images import load_rgb

    if not isinstance(caption, str) or not caption.strip():
        return BadSample(source, "empty caption")
    try:
        image = load_rgb(image_source)
    except UserError:
        raise  # a setting to fix (the pixel limit), not a bad file
    except Exception as error:  # noqa: BLE001 — any decoder failure on one file must not end a long run
        return BadSample(source, _failure_reason(error))
    item = {"image": transform(image), "caption": caption.strip()}
    if label is not None:
        item["label"] = label
    return item


class ReplaceBadSamples(torch.utils.data.Dataset):
    """Map-style wrapper keeping batches full: a bad item is replaced by the next good one (index + 1, + 2 ...).

    The drawn bad sample travels with its replacement (`item["skipped"]`, `item["replacement"]`) so the collate
    still counts it, as one draw; the bad ones passed over on the way are not, as each is counted when its own index
    is drawn: one pass over the data counts every bad row once. Equal batch sizes on every process are what the
    gathered contrastive loss needs."""

    def __init__(self, dataset, max_tries: int = 32):
        self.dataset = dataset
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        skipped = []
        for offset in range(min(self.max_tries, len(self.dataset))):
            item = self.dataset[(index + offset) % len(self.dataset)]
            if isinstance(item, dict):
                return {**item, "skipped": skipped[:1], "replacement": True} if skipped else item  # see above
            skipped.append(str(item) if item is not None else "unknown sample (None)")
        raise UserError(f"{len(skipped)} consecutive samples are unreadable, e.g. {', '.join(skipped[:MAX_EXAMPLES])}")


class SkipBadSamplesInStream(torch.utils.data.IterableDataset):
    """Streaming counterpart of ReplaceBadSamples: bad items are dropped and ride along with the next good item."""

    def __init__(self, dataset):
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def resume_after(self, batches: int, batch_size: int) -> bool:
        """Have the wrapped stream skip its first `batches` batches itself; False if it cannot (see WebDatasetShards)."""
        return hasattr(self.dataset, "resume_after") and self.dataset.resume_after(batches, batch_size)

    def __iter__(self):
        skipped = []
        for item in self.dataset:
            if isinstance(item, dict):
                yield {**item, "skipped": skipped} if skipped else item
                skipped = []
            else:
                skipped.append(str(item) if item is not None else "unknown sample (None)")


def robust(dataset):
    """`dataset` with bad samples replaced (map-style) or skipped (streams), and counted either way; None stays None."""
    if dataset is None:
        return None
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return SkipBadSamplesInStream(dataset)
    return ReplaceBadSamples(dataset)


def collate_captions(batch: list) -> dict:
    """Stack the usable items of a batch; BadSample / None items, and the ones replaced, are dropped and counted.

    Returns {"images": (B, 3, H, W) float, "captions": list[str], "labels": (B,) long (only when every item has
    one), "skipped": int, "skipped_examples": list[str], "replacements": int (items standing in for a skipped
    sample), "all_captions": list[list[str]] (only when an item carries its several "captions")}. B may be smaller
    than the batch, or 0."""
    batch = [item for entry in batch for item in (entry if isinstance(entry, list) else [entry])]  # GroupedItems
    items = [item for item in batch if isinstance(item, dict)]
    bad = [str(item) if item is not None else "unknown sample (None)" for item in batch if not isinstance(item, dict)]
    bad += [example for item in items for example in item.get("skipped", ())]
    collated = {
        "images": torch.stack([item["image"] for item in items]) if items else torch.empty(0, 3, 0, 0),
        "captions": [item["caption"] for item in items],
        "skipped": len(bad),
        "skipped_examples": bad[:MAX_EXAMPLES],
        "replacements": sum(bool(item.get("replacement")) for item in items),
    }
    if any("captions" in item for item in items):
        collated["all_captions"] = [item.get("captions", [item["caption"]]) for item in items]
    if items and all("label" in item for item in items):
        collated["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.long)
    return collated


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


class BadSampleTracker:
    """Counts skipped samples over a run: warns once naming examples, raises UserError past `max_bad_fraction`.

    The fraction is only judged after `min_samples` samples, so one early bad file does not end a run."""

    def __init__(self, max_bad_fraction: float = 0.01, min_samples: int = 50, log: Callable[[str], None] = _print_to_stderr):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.log = log
        self.seen = 0
        self.skipped = 0
        self.examples: list[str] = []

    def update(self, batch: dict) -> None:
        """Add one collated batch's counts (its captions and its "skipped" / "skipped_examples" / "replacements")."""
        skipped = batch["skipped"]
        self.seen += len(batch["captions"]) - batch.get("replacements", 0) + skipped  # samples drawn
        if not skipped:
            return
        first_warning = self.skipped == 0
        self.skipped += skipped
        self.examples.extend(batch["skipped_examples"][: MAX_EXAMPLES - len(self.examples)])
        limit = f"{100 * self.max_bad_fraction:g}%"
        if self.seen >= self.min_samples and self.skipped > self.max_bad_fraction * self.seen:
            raise UserError(
                f"{self.skipped} of {self.seen} samples were unreadable (more than {limit}), e.g. {self._examples()}"
                " — fix or remove them, or raise data.max_bad_fraction"
            )
        if first_warning:
            self.log(f"warning: skipping unreadable samples, e.g. {self._examples()} (training stops if more than "
                     f"{limit} are; data.max_bad_fraction)")

    def _examples(self) -> str:
        return ", ".join(self.examples) if self.examples else "(no names reported)"
