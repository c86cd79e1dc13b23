"""WebDataset shards read with the `webdataset` library (open_clip's): local paths, brace ranges, `pipe:` commands and
http(s)/s3 URLs; img2dataset-style samples (an image + .txt and/or .json); several captions per image.

Items are {"image", "caption"} dicts or BadSample markers (mmgen.data.robust counts them)."""

from __future__ import annotations

import io
import json
import random
import re
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import webdataset
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import UserError
from .robust import BadSample, load_sample

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHUFFLE_BUFFER = 1000  # raw samples per reader when streaming shards for training
CAPTION_CHOICES = ("random", "first", "all")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def is_shard_url(spec: str) -> bool:
    """Whether `spec` names shards by a `pipe:` command or a URL (anything with a scheme) rather than a local path."""
    return spec.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+.-]*://", spec) is not None


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order (webdataset's expansion): "s-{00..02}.tar" -> s-00, s-01, s-02;
    "{a,b}" -> a, b; "A::B" -> A, B. A backwards range is a UserError (a typo, not a wish to read in reverse)."""
    for start, end in _RANGE.findall(pattern):
        if int(end) < int(start):
            raise UserError(f"{pattern}: bad range {{{start}..{end}}}; expected e.g. {{000..009}}")
    return webdataset.shardlists.expand_urls(pattern)


def shard_list(spec: str) -> list[str] | None:
    """The shards `spec` names, or None if it names none: a URL or `pipe:` command (braces expanded), a brace
    pattern of local files (all must exist), a .tar file or a folder holding .tar files."""
    if is_shard_url(spec):
        return expand_braces(spec)
    if "{" in spec:
        shards = [str(Path(name).expanduser()) for name in expand_braces(spec)]
        missing = [shard for shard in shards if not Path(shard).is_file()]
        if missing:
            raise UserError(f"{len(missing)} of the {len(shards)} shards named by {spec} do not exist, e.g. {missing[0]}")
        return shards
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES)) or None
    return [str(path)] if path.is_file() and path.name.endswith(SHARD_SUFFIXES) else None


def open_shard(url: str):
    """A binary stream of one shard: webdataset's gopen (files, `pipe:CMD`, http(s) through curl); s3:// goes through
    `aws s3 cp URL -`, as open_clip's users write it by hand."""
    if url.startswith("s3://"):
        url = f"pipe:aws s3 cp {url} -"
    stream = webdataset.gopen(url, "rb")
    if hasattr(stream, "ignore_errors"):  # a webdataset Pipe (pipe:, http(s) through curl)
        # its exit status is checked once, at close (_close): webdataset's check on every read raises as soon as the
        # command has exited, even with its output still unread in the pipe, so a command that failed after writing
        # its data would lose the data it did write, or not, depending on timing
        stream.ignore_errors = True
    return stream


class _EndAwareTarInfo(tarfile.TarInfo):
    """TarInfo that notes on the archive why reading headers stopped, so that a shard cut short at a member
    boundary (no end-of-archive zero block: tarfile, and so webdataset's tar iterator, just stops) can be told
    from a complete one."""

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


def _tar_members(shard: str) -> Iterator:
    """{"fname", "data", "__url__"} per file of a shard (webdataset's member records); a damaged, truncated or
    unopenable shard, or a `pipe:` command that fails, ends in a BadSample (and a warning)."""
    stop, failure, stream = None, None, None
    try:
        stream = open_shard(shard)
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo) as archive:
            for member in archive:
                if member.isfile():
                    yield {"fname": member.name, "data": archive.extractfile(member).read(), "__url__": shard}
            stop = getattr(archive, "mmgen_stop", None)
    except GeneratorExit:  # the reader stopped early: a command cut off mid-stream is no damage
        _close(stream)
        raise
    except (OSError, EOFError, tarfile.TarError, ValueError) as error:
        failure = error
    failure = _close(stream) or failure  # a pipe: command's exit status is checked here
    if failure is not None:
        yield _damaged_shard(shard, str(failure).splitlines()[0] if str(failure) else type(failure).__name__)
    elif isinstance(stop, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        yield _damaged_shard(shard, "truncated (it ends without the end-of-archive blocks)")
    elif not isinstance(stop, tarfile.EOFHeaderError):  # a damaged header after the first member
        yield _damaged_shard(shard, f"damaged header ({stop})" if stop else "damaged")


def _close(stream) -> OSError | None:
    """Close a shard's stream; the error closing it raised (a failed pipe: command), if any."""
    try:
        if stream is not None:
            stream.close()
    except OSError as error:
        return error
    status = getattr(stream, "status", None)  # a pipe: (or curl) command's exit status
    if status and status not in getattr(stream, "ignore_status", ()):
        return OSError(_exit_reason(stream, status))
    return None


# what the exit statuses people meet mean: curl's (http(s) shards; curl -f) and the shell's (pipe: commands)
CURL_EXITS = {6: "host not found", 7: "cannot connect", 22: "HTTP error, e.g. 404 not found", 28: "timed out",
              35: "TLS handshake failed", 56: "connection lost"}
SHELL_EXITS = {126: "command not executable", 127: "command not found"}


def _exit_reason(stream, status: int) -> str:
    """Why a shard's command failed, in words: "download failed: cannot connect (curl exit 7)", "command failed
    (exit 3)"; webdataset's Pipe keeps the command as its `args` ((command, ...), keyword arguments)."""
    command = getattr(stream, "args", ((None,), {}))[0][0]
    if isinstance(command, list) and command[:1] == ["curl"]:
        return f"download failed: {CURL_EXITS.get(status, 'error')} (curl exit {status})"
    return f"command failed: {SHELL_EXITS[status]} (exit {status})" if status in SHELL_EXITS else \
        f"command failed (exit {status})"


def shard_samples(shard: str) -> Iterator:
    """The samples of one shard: webdataset's dicts {"__key__", "__url__", EXTENSION: bytes ...} grouped by key, then
    a BadSample if the shard is damaged."""
    damage = []

    def members():
        for member in _tar_members(shard):
            if isinstance(member, BadSample):
                damage.append(member)
            else:
                yield member

    # a file name twice in one sample keeps the first (webdataset's grouping would stop the stream)
    yield from webdataset.tariterators.group_by_keys(members(), handler=webdataset.ignore_and_continue)
    yield from damage


def sample_captions(files: dict) -> list[str] | str:
    """The captions of a sample: the non-empty lines of its .txt, else its .json's "captions" list / "caption" (or a
    JSON list of strings); a reason string when it has none usable."""
    if "txt" in files:
        try:
            text = files["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return "caption is not UTF-8"
        return [line.strip() for line in text.splitlines() if line.strip()] or "empty caption"
    if "json" not in files:
        return "no .txt caption"
    try:
        meta = json.loads(files["json"])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "metadata is not valid JSON"
    if isinstance(meta, dict):
        meta = meta.get("captions", meta.get("caption"))
    meta = [meta] if isinstance(meta, str) else meta
    if not isinstance(meta, list) or not all(isinstance(caption, str) for caption in meta):
        return "no caption in the .json"
    return [caption.strip() for caption in meta if caption.strip()] or "empty caption"


class WebDatasetShards(IterableDataset):
    """Image + caption samples streamed from WebDataset shards with the `webdataset` library.

    Every (process, DataLoader worker) pair is one reader: with at least as many shards as readers each reads its
    own shards, otherwise every reader reads all shards and keeps every readers-th sample. Evaluation
    (`shuffle_buffer` 0) is one pass in file order. Training (`shuffle_buffer` > 0) shuffles the shards in a
    (seed, epoch) order and the samples through a seeded buffer, and is endless (`endless`, by default whether it
    shuffles): epoch after epoch, so that the DataLoader takes its batches from its workers strictly in turn and a
    resumed run can skip, per reader, exactly the samples already seen (`resume_after`). `captions_per_image` picks
    among several captions: "random" (seeded by seed, epoch and sample) or "first"; "all" keeps the first as
    "caption" and every one in "captions" (for a contrastive loss with several positives per image)."""

    def __init__(self, shards: Sequence[str | Path], transform: Callable, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_buffer: int = 0, captions_per_image: str = "random",
                 endless: bool | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if captions_per_image not in CAPTION_CHOICES:
            raise UserError(f"captions_per_image must be one of {', '.join(CAPTION_CHOICES)}, got {captions_per_image!r}")
        self.shards = [str(shard) for shard in shards]
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.captions_per_image = captions_per_image
        self.endless = bool(shuffle_buffer) if endless is None else endless
        self.epoch = 0
        self.batches_done, self.batch_size = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Read epoch `epoch` next (every process must pass the same epoch)."""
        self.epoch = epoch

    def resume_after(self, batches: int, batch_size: int) -> bool:
        """Start a training stream after the first `batches` DataLoader batches of `batch_size` items: DataLoader
        worker w of W skips the samples of its batches among them (batches w, w + W, ...) without decoding them.
        False (and nothing changes) for an evaluation stream, which ends, so that batches stop coming in turn."""
        if not self.endless:
            return False
        self.batches_done, self.batch_size = batches, batch_size
        return True

    def _reader(self) -> tuple[int, int, int, int]:
        """(reader, readers, worker, workers) of the calling process and DataLoader worker."""
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        return self.rank * workers + worker_id, self.world_size * workers, worker_id, workers

    def _epoch_samples(self, epoch: int, reader: int, readers: int) -> Iterator:
        shards = self.shards
        if self.shuffle_buffer:  # the same order in every reader, so the split below stays disjoint
            shards = [shards[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(shards))]
        if len(shards) >= readers:
            for shard in shards[reader::readers]:
                yield from shard_samples(shard)
            return
        for position, sample in enumerate(sample for shard in shards for sample in shard_samples(shard)):
            if position % readers == reader:
                yield sample

    def _raw_samples(self, reader: int, readers: int) -> Iterator:
        """This reader's raw samples: one pass from `self.epoch`, or epoch after epoch when endless."""
        for epoch in range(self.epoch, sys.maxsize if self.endless else self.epoch + 1):
            samples = self._epoch_samples(epoch, reader, readers)
            if self.shuffle_buffer:
                rng = random.Random(f"{self.seed}-{epoch}-{reader}")
                samples = webdataset.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
            usable = False
            for sample in samples:
                if isinstance(sample, dict):
                    usable, sample["__epoch__"] = True, epoch
                yield sample
            if not usable:
                return  # nothing to read: end rather than loop forever

    def __iter__(self):
        reader, readers, worker, workers = self._reader()
        samples = self._raw_samples(reader, readers)
        skip = 0
        if self.batches_done > worker:
            skip = (self.batches_done - worker + workers - 1) // workers * self.batch_size
        for sample in samples:
            if skip:  # bad samples were counted when first seen; one whose image fails to decode counts as a
                # good one here (telling would mean decoding it): the one case where a resumed run starts early
                skip -= isinstance(sample, dict) and self._image_key(sample) is not None and \
                    isinstance(self._captions(sample), list)
                continue
            yield sample if isinstance(sample, BadSample) else self._decode(sample)

    @staticmethod
    def _image_key(sample: dict) -> str | None:
        return next((extension for extension in IMAGE_EXTENSIONS if extension in sample), None)

    def _captions(self, sample: dict) -> list[str] | str:
        return sample.setdefault("__captions__", sample_captions(sample))

    def _decode(self, sample: dict):
        source = f"{sample['__url__']}:{sample['__key__']}"
        image_key = self._image_key(sample)
        if image_key is None:
            return BadSample(source, "no image file")
        captions = self._captions(sample)
        if isinstance(captions, str):
            return BadSample(source, captions)
        if self.captions_per_image == "all":
            item = load_sample(io.BytesIO(sample[image_key]), captions[0], self.transform, source=source)
            return {**item, "captions": captions} if isinstance(item, dict) else item
        choice = 0
        if self.captions_per_image == "random" and len(captions) > 1:
            key = [self.seed, sample.get("__epoch__", self.epoch), zlib.crc32(source.encode())]
            choice = int(np.random.default_rng(key).integers(len(captions)))
        return load_sample(io.BytesIO(sample[image_key]), captions[choice], self.transform, source=source)
