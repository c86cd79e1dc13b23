"""Image-caption datasets, the format chosen by what `spec` is (see `build_caption_dataset`).

Items are {"image": (3, S, S) float tensor, "caption": str[, "label": int]} or a BadSample marker for an unusable
sample; batch them with `robust.collate_captions`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from ..errors import UserError
from .images import image_transform
from .robust import BadSample, load_sample
from .shapes import SPLITS, ShapesDataset
from .shards import IMAGE_EXTENSIONS, SHUFFLE_BUFFER, WebDatasetShards, expand_braces, shard_list

__all__ = ["build_caption_dataset", "expand_braces", "CaptionTable", "LabelledImageFolder", "WebDatasetShards"]

TABLE_FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "an image of a {}.",
    "a cropped photo of a {}.",
)


def build_caption_dataset(
    spec: str,
    *,
    split: str = "train",
    image_size: int = 64,
    train: bool = True,
    normalize: str = "clip",
    crop_scale: tuple[float, float] | None = (0.9, 1.0),
    columns: Sequence[str] = ("image", "caption"),
    templates: Sequence[str] | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shapes_options: Mapping | None = None,
    captions_per_image: str = "random",
):
    """The caption dataset that `spec` names:

    - "shapes[:SPLIT][:SIZE][:extra=SHAPE,...[:extra_fraction=F]]" (e.g. "shapes", "shapes:val:500",
      "shapes:train:extra=heart:extra_fraction=0.5") -> ShapesDataset, with opt-in extra shapes
      (mmgen.data.shapes.EXTRA_SHAPES) making up a share F of the items if given; SPLIT defaults to `split` (the
      only use of `split`: for a path, the file is the split). "./shapes" means a path.
    - a .csv / .tsv / .jsonl table -> CaptionTable with `columns` = (image column, caption column);
    - a .tar shard, a folder of .tar shards, a brace pattern "shards-{000..009}.tar", a `pipe:COMMAND` or an
      http(s)/s3 URL (braces allowed) -> WebDatasetShards (mmgen.data.shards), streamed and split over
      (rank, world_size) and DataLoader workers; with several captions per image (.txt lines or a .json list) training
      draws one (`captions_per_image` "random"), takes the first ("first"; evaluation always does) or keeps them
      all ("all": items also carry "captions", for CLIP's several positives per image);
    - a folder with one sub-folder of images per class -> LabelledImageFolder with prompt `templates`.
    `train` picks random crops (`crop_scale`; shapes are never cropped) and shuffled shards; `normalize` is
    "clip" or "minus_one_to_one"; `shapes_options` are ShapesDataset keyword arguments (group_size, partial_captions,
    grey_without_colour), used only for shapes.
    Problems with the path or its contents raise UserError."""
    if spec == "shapes" or spec.startswith("shapes:"):
        return _shapes_dataset(spec, split, image_size, seed, normalize, shapes_options or {})
    transform = image_transform(image_size, train=train, normalize=normalize, crop_scale=crop_scale)
    stream = {"rank": rank, "world_size": world_size, "seed": seed, "shuffle_buffer": SHUFFLE_BUFFER if train else 0,
              "captions_per_image": captions_per_image if train else "first"}
    shards = shard_list(spec)
    if shards is not None:
        return WebDatasetShards(shards, transform, **stream)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data path not found: {path}")
    if path.is_dir():
        return LabelledImageFolder(path, transform, templates=templates, train=train, seed=seed)
    if path.suffix.lower() in TABLE_FORMATS:
        return CaptionTable(path, transform, columns=columns)
    raise UserError(
        f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; expected a .csv/.tsv/.jsonl table, "
        ".tar shards (a file, a folder, a {000..009} pattern, a pipe: command or a URL), a folder of class sub-folders, or 'shapes'"
    )


def _shapes_dataset(spec: str, split: str, image_size: int, seed: int, normalize: str, options: Mapping) -> ShapesDataset:
    size, options = None, dict(options)
    for part in spec.split(":")[1:]:
        if part in SPLITS:
            split = part
        elif part.isdigit() and int(part) > 0:
            size = int(part)
        elif part.startswith("extra=") and part != "extra=":
            options["extra_shapes"] = tuple(part[len("extra="):].split(","))
        elif part.startswith("extra_fraction="):
            try:
                options["extra_fraction"] = float(part[len("extra_fraction="):])
            except ValueError:
                raise UserError(f"data spec {spec!r}: {part!r} is not extra_fraction=NUMBER") from None
        else:
            raise UserError(f"data spec {spec!r}: {part!r} is neither a split ({', '.join(SPLITS)}), a size, "
                            "extra=SHAPE[,SHAPE] nor extra_fraction=F")
    return ShapesDataset(split, size, image_size, seed, normalize=normalize, **options)


class CaptionTable(Dataset):
    """Rows of image path + caption from a .csv, .tsv or .jsonl file; relative paths start at the file's folder."""

    def __init__(self, path: str | Path, transform: Callable, *, columns: Sequence[str] = ("image", "caption")):
        self.path = Path(path)
        self.transform = transform
        image_column, caption_column = columns
        header, rows = _read_table(self.path)
        if not rows:
            raise UserError(f"{self.path}: the table has no rows")
        for column in (image_column, caption_column):
            if column not in header:
                raise UserError(f"{self.path}: no column {column!r} (it has {', '.join(map(repr, header))}); "
                                "set data.columns to the image and caption column names")
        self.images = [row.get(image_column) for row in rows]
        self.captions = [row.get(caption_column) for row in rows]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if not isinstance(image, str) or not image.strip():
            return BadSample(f"{self.path} row {index + 1}", "no image path")
        image_path = self.path.parent / image.strip()  # an absolute path replaces the folder
        return load_sample(image_path, self.captions[index], self.transform, source=str(image_path))


def _read_table(path: Path) -> tuple[list[str], list[dict]]:
    """(column names, rows) of a .csv/.tsv (with a header line) or .jsonl (one object a line) file."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            if path.suffix.lower() == ".jsonl":
                return _read_jsonl(path, file)
            delimiter = TABLE_FORMATS[path.suffix.lower()]
            # TSV files are rarely quoted, and a stray quote must not swallow the rows after it
            quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
            reader = csv.DictReader(file, delimiter=delimiter, quoting=quoting)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except csv.Error as error:
        raise UserError(f"{path}: not a valid table ({error})") from None


def _read_jsonl(path: Path, lines) -> tuple[list[str], list[dict]]:
    rows, header = [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number}: not valid JSON ({error})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        header.update(dict.fromkeys(row))
    return list(header), rows


def class_name(folder_name: str) -> str:
    """The class name of a folder: "golden_retriever" / "golden-retriever" -> "golden retriever"."""
    return " ".join(folder_name.replace("_", " ").replace("-", " ").split())


class LabelledImageFolder(Dataset):
    """root/CLASS/*.jpg...: items carry "label" and a caption from a prompt template filled with the class name.

    Training draws the template per item from (seed, index); evaluation always uses the first template."""

    def __init__(self, root: str | Path, transform: Callable, *, templates: Sequence[str] | None = None,
                 train: bool = True, seed: int = 0):
        self.root = Path(root)
        self.transform = transform
        self.templates = tuple(templates or DEFAULT_TEMPLATES)
        self.train = train
        self.seed = seed
        for template in self.templates:
            if "{}" not in template:
                raise UserError(f"prompt template {template!r} has no {{}} for the class name")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise UserError(f"{self.root}: no .tar shards and no class sub-folders "
                            "(a labelled image folder needs one sub-folder of images per class)")
        self.classes = [class_name(folder.name) for folder in folders]
        self.files: list[Path] = []
        self.labels: list[int] = []
        for label, folder in enumerate(folders):
            images = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
            self.files.extend(images)
            self.labels.extend([label] * len(images))
        if not self.files:
            raise UserError(f"{self.root}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        """The caption of item `index`: a template filled with its class name."""
        choice = np.random.default_rng([self.seed, index]).integers(len(self.templates)) if self.train else 0
        return self.templates[choice].format(self.classes[self.labels[index]])

    def __getitem__(self, index: int):
        path = self.files[index]
        return load_sample(path, self.caption(index), self.transform, source=str(path), label=self.labels[index])
