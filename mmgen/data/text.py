"""Text corpora for the language model: finding Tiny Shakespeare, and fixed-length token windows."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_write_text

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt"


def cache_dir() -> Path:
    """Where mmgen keeps downloaded data: $MMGEN_CACHE, else ~/.cache/mmgen."""
    return Path(os.environ.get("MMGEN_CACHE", Path.home() / ".cache" / "mmgen"))


def _shared_copies() -> list[Path]:
    # the data folder shipped beside the repository (../shared/data), seen from the checkout or the cwd
    repository = Path(__file__).resolve().parents[2]
    return [
        repository.parent / "shared" / "data" / TINY_SHAKESPEARE_FILE,
        Path.cwd().parent / "shared" / "data" / TINY_SHAKESPEARE_FILE,
        cache_dir() / TINY_SHAKESPEARE_FILE,
    ]


def tiny_shakespeare_path(download: bool = True) -> Path:
    """A local copy of Tiny Shakespeare: ../shared/data, the cache, or a fresh download into the cache."""
    for candidate in _shared_copies():
        if candidate.is_file():
            return candidate
    target = cache_dir() / TINY_SHAKESPEARE_FILE
    how = f"pass data.path=FILE, or put the file at {target}"
    if not download:
        raise UserError(f"Tiny Shakespeare not found; {how}")
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=20) as response:
            text = response.read().decode("utf-8")
    except (OSError, ValueError) as error:
        raise UserError(f"Tiny Shakespeare not found locally and the download failed ({error}); {how}") from None
    atomic_write_text(target, text)
    return target


def read_corpus(path: str | Path | None) -> str:
    """The training text: `path` if given, else Tiny Shakespeare. Missing, unreadable or empty is a UserError."""
    path = tiny_shakespeare_path() if path is None else Path(path)
    if not path.is_file():
        raise UserError(f"data.path: file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data.path: {path} is not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"data.path: {path} is empty")
    return text


class TokenWindows(torch.utils.data.Dataset):
    """Every window of `length + 1` consecutive tokens: inputs are the first `length`, targets the last."""

    def __init__(self, tokens: torch.Tensor, length: int):
        if len(tokens) < length + 1:
            raise UserError(f"a text of {len(tokens)} tokens is too short for windows of {length} + 1 tokens")
        self.tokens = tokens
        self.length = length
        self._offsets = torch.arange(length + 1)

    def __len__(self) -> int:
        return len(self.tokens) - self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tokens[index : index + self.length + 1]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        """A whole batch in one gather (the DataLoader calls this instead of __getitem__ per sample)."""
        starts = torch.as_tensor(indices)
        return self.tokens[starts[:, None] + self._offsets]  # (batch, length + 1)


def stack_windows(batch) -> torch.Tensor:
    """Collate for TokenWindows: already a tensor when fetched with __getitems__."""
    return batch if torch.is_tensor(batch) else torch.stack(batch)
