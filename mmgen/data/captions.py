"""Image-caption datasets, the format chosen by what `spec` is (see `build_caption_dataset`).

Items are {"image": (3, S, S) float tensor, "caption": str[, "label": int]} or a BadSample marker for an unusable
sample; batch them with `robust.collate_captions`.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..errors import UserError
from .images import image_transform
from .robust import BadSample, load_sample
from .shapes import SPLITS, ShapesDataset

TABLE_FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "an image of a {}.",
    "a cropped photo of a {}.",
)
SHUFFLE_BUFFER = 1000  # raw samples per reader when streaming shards for training


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
):
    """The caption dataset that `spec` names:

    - "shapes[:SPLIT][:SIZE][:extra=SHAPE,...[:extra_fraction=F]]" (e.g. "shapes", "shapes:val:500",
      "shapes:train:extra=heart:extra_fraction=0.5") -> ShapesDataset, with opt-in extra shapes
      (mmgen.data.shapes.EXTRA_SHAPES) making up a share F of the items if given; SPLIT defaults to `split` (the
      only use of `split`: for a path, the file is the split). "./shapes" means a path.
    - a .csv / .tsv / .jsonl table -> CaptionTable with `columns` = (image column, caption column);
    - a .tar shard, a folder of .tar shards or a brace pattern "shards-{000..009}.tar" -> WebDatasetShards,
      streamed and split over (rank, world_size) and DataLoader workers;
    - a folder with one sub-folder of images per class -> LabelledImageFolder with prompt `templates`.
    `train` picks random crops (`crop_scale`; shapes are never cropped) and shuffled shards; `normalize` is
    "clip" or "minus_one_to_one"; `shapes_options` are ShapesDataset keyword arguments (group_size, partial_captions,
    grey_without_colour), used only for shapes.
    Problems with the path or its contents raise UserError."""
    if spec == "shapes" or spec.startswith("shapes:"):
        return _shapes_dataset(spec, split, image_size, seed, normalize, shapes_options or {})
    transform = image_transform(image_size, train=train, normalize=normalize, crop_scale=crop_scale)
    stream = {"rank": rank, "world_size": world_size, "seed": seed, "shuffle_buffer": SHUFFLE_BUFFER if train else 0}
    if "{" in spec:
        shards = [str(Path(name).expanduser()) for name in expand_braces(spec)]
        missing = [shard for shard in shards if not Path(shard).is_file()]
        if missing:
            raise UserError(f"{len(missing)} of the {len(shards)} shards named by {spec} do not exist, e.g. {missing[0]}")
        return WebDatasetShards(shards, transform, **stream)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data path not found: {path}")
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
        if shards:
            return WebDatasetShards(shards, transform, **stream)
        return LabelledImageFolder(path, transform, templates=templates, train=train, seed=seed)
    if path.name.endswith(SHARD_SUFFIXES):
        return WebDatasetShards([path], transform, **stream)
    if path.suffix.lower() in TABLE_FORMATS:
        return CaptionTable(path, transform, columns=columns)
    raise UserError(
        f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; expected a .csv/.tsv/.jsonl table, "
        ".tar shards (a file, a folder or a {000..009} pattern), a folder of class sub-folders, or 'shapes'"
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


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: "s-{00..02}.tar" -> s-00, s-01, s-02; "{a,b}" -> a, b."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if ".." in body:
        start, end = body.split("..", 1)
        if not (start.isdigit() and end.isdigit()) or int(end) < int(start):
            raise UserError(f"{pattern}: bad range {{{body}}}; expected e.g. {{000..009}}")
        options = [f"{number:0{len(start)}d}" for number in range(int(start), int(end) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [name for option in options for name in expand_braces(head + option + tail)]


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


class WebDatasetShards(IterableDataset):
    """Streams image + .txt samples from WebDataset .tar shards (Python's tarfile, no extra dependency).

    Every (process, DataLoader worker) pair is one reader: with at least as many shards as readers each reads
    its own shards, otherwise every reader scans all shards and keeps every readers-th sample. One pass per
    iteration; with `shuffle_buffer` > 0 the shard order (seeded by seed and `set_epoch`) and the samples (a
    buffer of that many) are shuffled."""

    def __init__(self, shards: Sequence[str | Path], transform: Callable, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_buffer: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.shards = [str(shard) for shard in shards]
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the shards differently in the next pass (every process must pass the same epoch)."""
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        return self.rank * workers + worker_id, self.world_size * workers

    def _raw_samples(self) -> Iterator:
        reader, readers = self._reader()
        shards = self.shards
        if self.shuffle_buffer:  # the same order in every reader, so the split below stays disjoint
            shards = [shards[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))]
        if len(shards) >= readers:
            for shard in shards[reader::readers]:
                yield from _tar_samples(shard)
            return
        for position, sample in enumerate(sample for shard in shards for sample in _tar_samples(shard)):
            if position % readers == reader:
                yield sample

    def __iter__(self):
        samples = self._raw_samples()
        if self.shuffle_buffer:
            reader, _ = self._reader()
            samples = _shuffled(samples, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, reader, 1]))
        for sample in samples:
            yield sample if isinstance(sample, BadSample) else self._decode(*sample)

    def _decode(self, source: str, files: dict):
        image_key = next((extension for extension in IMAGE_EXTENSIONS if extension in files), None)
        if image_key is None:
            return BadSample(source, "no image file")
        if "txt" not in files:
            return BadSample(source, "no .txt caption")
        try:
            caption = files["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return BadSample(source, "caption is not UTF-8")
        return load_sample(io.BytesIO(files[image_key]), caption, self.transform, source=source)


class _EndAwareTarInfo(tarfile.TarInfo):
    """TarInfo that notes on the archive why reading headers stopped, so that a shard cut short at a member
    boundary (no end-of-archive zero block: tarfile just stops) can be told from a complete one."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as error:
            archive.mmgen_stop = error
            raise


_warned_shards: set[str] = set()  # shards already named in a warning by this process


def _damaged_shard(shard: str, reason: str) -> BadSample:
    """The BadSample for a damaged shard, warning about it once per shard (the tracker names only a few)."""
    if shard not in _warned_shards:
        _warned_shards.add(shard)
        print(f"warning: {shard}: {reason}; the samples after that point are lost", file=sys.stderr)
    return BadSample(shard, f"unreadable shard: {reason}")


def _tar_samples(shard: str) -> Iterator:
    """(shard:key, {extension: bytes}) for each run of members sharing a key; a damaged or truncated shard ends
    in a BadSample (and a warning)."""
    key, files = None, {}
    try:
        with tarfile.open(shard, mode="r|*", tarinfo=_EndAwareTarInfo) as archive:
            for member in archive:
                folder, _, name = member.name.rpartition("/")
                stem, dot, extension = name.partition(".")
                if not member.isfile() or not dot or not stem:
                    continue
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key:
                    if key is not None:
                        yield f"{shard}:{key}", files
                    key, files = member_key, {}
                files[extension.lower()] = archive.extractfile(member).read()
            stop = getattr(archive, "mmgen_stop", None)
    except (OSError, EOFError, tarfile.TarError) as error:
        yield _damaged_shard(shard, str(error) or type(error).__name__)
        return
    if key is not None:
        yield f"{shard}:{key}", files
    if isinstance(stop, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        yield _damaged_shard(shard, "truncated (it ends without the end-of-archive blocks)")
    elif not isinstance(stop, tarfile.EOFHeaderError):  # a damaged header after the first member
        yield _damaged_shard(shard, f"damaged header ({stop})" if stop else "damaged")


def _shuffled(samples: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Samples in a random order drawn from a buffer of `buffer_size`."""
    buffer = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            index = rng.integers(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer
