"""The one owner of a run folder's layout: what lives where under RUN_DIR, and the rules for changing it.

```
RUN_DIR/config.yaml               the resolved recipe config (what --resume reads)
RUN_DIR/metrics.jsonl             one JSON object per log / evaluation
RUN_DIR/tensorboard/              the same scalars for TensorBoard
RUN_DIR/profile/                  train.profile=true: torch.profiler trace and op summary of a few steps, per rank
RUN_DIR/checkpoints/step-N/       resumable state (model, optimizer, RNG, trainer_state.json, ema.safetensors)
RUN_DIR/final/                    the trained model folder
RUN_DIR/best/                     train.best_metric: the model of the evaluation where that metric was best (+ best.json)
```

Every change is a rename of a finished temporary folder (`.step-N.tmp`, `.final.tmp-*`), so a crash never leaves a
half-written checkpoint under its real name; `clean()` removes what a killed process left behind. While a process
trains in the folder it holds an exclusive lock on it (flock on the folder itself: the kernel drops it when the
process dies, so a lock left by a killed run is taken over without any stale-lock file to judge).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import CheckpointError, UserError
from .io import atomic_write_text, read_json, write_json

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
PROFILE_FOLDER = "profile"
CHECKPOINTS_FOLDER = "checkpoints"
FINAL_FOLDER = "final"
BEST_FOLDER = "best"
BEST_RECORD = "best.json"  # in best/: the metric, its value and the step
TRAINER_STATE_FILE = "trainer_state.json"
EMA_WEIGHTS_FILE = "ema.safetensors"  # in a checkpoint: the EMA of the trainable weights (mmgen.training.ema)

# the layout version of model folders and checkpoints this mmgen writes; bump it when an older mmgen could no longer
# read what a newer one writes, so that the older one says so in one line instead of failing somewhere inside
FORMAT_VERSION = 1

_CHECKPOINT_NAME = re.compile(r"step-(\d+)")
_TEMPORARY_NAMES = (re.compile(r"\.step-\d+\.(tmp|old)"), re.compile(r"\.(final|best)\.(tmp|old)-.*"))
_HELD_LOCKS: dict[Path, int] = {}  # resolved run folder -> open file descriptor holding its flock
_CREATED_BY_LOCK: set[Path] = set()  # folders lock() created: unlock() removes them again while still empty


class RunFolderBusy(UserError):
    """Another process is training (or sampling) into the same folder."""


class RunFolder:
    """Paths and safe updates of one run folder (nothing is created until a method writes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ------------------------------------------------------------------ names
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tensorboard_folder(self) -> Path:
        return self.path / TENSORBOARD_FOLDER

    @property
    def profile_folder(self) -> Path:
        return self.path / PROFILE_FOLDER

    @property
    def final(self) -> Path:
        return self.path / FINAL_FOLDER

    @property
    def best(self) -> Path:
        return self.path / BEST_FOLDER

    @property
    def checkpoints_folder(self) -> Path:
        return self.path / CHECKPOINTS_FOLDER

    def checkpoint(self, step: int) -> Path:
        """RUN_DIR/checkpoints/step-N (whether or not it exists)."""
        return self.checkpoints_folder / f"step-{step}"

    # ------------------------------------------------------------------ reading
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Finished checkpoints as (step, folder), oldest first."""
        found = []
        if self.checkpoints_folder.is_dir():
            for child in self.checkpoints_folder.iterdir():
                match = _CHECKPOINT_NAME.fullmatch(child.name)
                if match and child.is_dir():
                    found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        """The checkpoint with the largest step, or None."""
        checkpoints = self.checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    # ------------------------------------------------------------------ writing
    def write_config(self, text: str) -> None:
        """Write config.yaml (atomically)."""
        atomic_write_text(self.config_file, text)

    def checkpoint_staging_path(self, step: int) -> Path:
        """The temporary folder checkpoint `step` is written into before `publish_checkpoint`."""
        return self.checkpoints_folder / f".step-{step}.tmp"

    def checkpoint_staging(self, step: int) -> Path:
        """Create the temporary folder of checkpoint `step`, empty."""
        staging = self.checkpoint_staging_path(step)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def discard_staging(self, step: int) -> None:
        """Remove the temporary folder of checkpoint `step` (after a failed write)."""
        shutil.rmtree(self.checkpoint_staging_path(step), ignore_errors=True)

    def publish_checkpoint(self, step: int) -> Path:
        """Rename the finished staging folder of `step` to checkpoints/step-N (replacing one of the same step)."""
        staging, folder = self.checkpoint_staging_path(step), self.checkpoint(step)
        if folder.exists():
            old = folder.with_name(f".step-{step}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, folder)
        return folder

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints; each is renamed away first, so none is ever half-deleted
        under its real name."""
        for step, folder in self.checkpoints()[:-keep] if keep > 0 else self.checkpoints():
            trash = folder.with_name(f".step-{step}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def clean(self) -> list[Path]:
        """Remove temporary folders left by a killed process; return what was removed.

        A kill between the two renames that replace final/ (or best/) leaves the old one inside `.final.old-*`
        (`.best.old-*`): it is put back, so neither is ever lost."""
        removed = []
        for parent in (self.path, self.checkpoints_folder):
            if not parent.is_dir():
                continue
            for child in sorted(parent.iterdir()):
                if not any(pattern.fullmatch(child.name) for pattern in _TEMPORARY_NAMES):
                    continue
                for name, target in ((FINAL_FOLDER, self.final), (BEST_FOLDER, self.best)):
                    previous = child / name
                    if child.name.startswith(f".{name}.old-") and previous.is_dir() and not target.exists():
                        os.replace(previous, target)
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        return removed

    # ------------------------------------------------------------------ trainer state
    @staticmethod
    def write_state(folder: Path, state: dict) -> None:
        """Write a checkpoint's trainer_state.json (step, processes, ...) with the version of mmgen writing it."""
        write_json(folder / TRAINER_STATE_FILE, {**state, **version_record()})

    @staticmethod
    def read_state(folder: Path) -> dict:
        """A checkpoint's trainer_state.json; one without a step, or of a newer format, is a CheckpointError."""
        state = read_json(folder / TRAINER_STATE_FILE)
        check_format(state, folder / TRAINER_STATE_FILE)
        if not isinstance(state.get("step"), int):
            raise CheckpointError(f"{folder / TRAINER_STATE_FILE}: no step recorded")
        return state

    # ------------------------------------------------------------------ lock
    def lock(self) -> None:
        """Take the exclusive lock on this folder (creating it); RunFolderBusy if another process holds it.

        Re-entrant within a process; held until `unlock()` or the process ends."""
        key = self.path.resolve()
        if key in _HELD_LOCKS:
            return
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path} is a file, not a folder; choose another --out")
        if not self.path.exists():
            self.path.mkdir(parents=True)
            _CREATED_BY_LOCK.add(key)
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(f"{self.path} is in use by another mmgen process; wait for it to end or choose "
                                    "another --out") from None
            raise
        _HELD_LOCKS[key] = descriptor

    def unlock(self) -> None:
        """Release the lock taken by `lock()` (no-op when not held). A folder it created that holds nothing but its
        config.yaml (the command failed before training began) is removed."""
        key = self.path.resolve()
        descriptor = _HELD_LOCKS.pop(key, None)
        if descriptor is not None:
            if key in _CREATED_BY_LOCK:
                _CREATED_BY_LOCK.discard(key)
                with contextlib.suppress(OSError):
                    if {child.name for child in self.path.iterdir()} <= {CONFIG_FILE}:
                        self.config_file.unlink(missing_ok=True)
                        self.path.rmdir()
            os.close(descriptor)

    def is_locked_here(self) -> bool:
        """True when this process holds the folder's lock."""
        return self.path.resolve() in _HELD_LOCKS


def version_record() -> dict:
    """What every config.json and checkpoint records of the mmgen that wrote it."""
    from . import __version__

    return {"mmgen_version": __version__, "format_version": FORMAT_VERSION}


def check_format(record: dict, path: Path) -> None:
    """Refuse, in one line, a file written in a newer format than this mmgen reads (no record: format 1)."""
    from . import __version__

    written = record.get("format_version", 1)
    if not isinstance(written, int) or isinstance(written, bool):
        raise CheckpointError(f"{path}: format_version must be an integer, got {written!r}")
    if written > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by mmgen {record.get('mmgen_version', '?')} in format {written}; "
                              f"this mmgen ({__version__}) reads format {FORMAT_VERSION} at most: upgrade mmgen")


def check_output_path(path: str | Path, flag: str = "--out") -> bool:
    """Refuse a path that is a file, lies under a file, or cannot be created or read (one line naming `flag`);
    return whether it is a folder that already holds files."""
    path = Path(path)
    nearest = next(parent for parent in (path, *path.parents) if parent.exists())  # "." or "/" at the latest
    if not nearest.is_dir():
        where = "" if nearest == path else f"cannot be created: {nearest} "
        raise UserError(f"{flag} {path} {where}is a file, not a folder; choose another {flag}")
    if nearest != path and not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be created: {nearest} is not writable; choose another {flag}")
    try:
        return nearest == path and any(path.iterdir())
    except OSError as error:
        raise UserError(f"{flag} {path} cannot be read ({error.strerror}); choose another {flag}") from None


@contextlib.contextmanager
def new_output_folder(target: str | Path):
    """Yield a staging folder whose contents become the new folder `target` in one rename at the end.

    `target` is created empty and locked first, so a second command naming it is refused at once instead of
    replacing the first one's files; if the body raises, nothing is left behind (an empty `target` we created is
    removed)."""
    target = Path(target)
    check_output_path(target)  # a file, or a path under one, is one line before anything is created
    RunFolder(target).lock()
    staging = None
    try:
        if any(target.iterdir()):
            raise UserError(f"{target} already exists and is not empty; choose another --out (nothing is overwritten)")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        yield staging
        os.replace(staging, target)  # replaces the empty folder
    finally:
        RunFolder(target).unlock()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
