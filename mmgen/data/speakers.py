"""Tiny Shakespeare's speakers: a labelled text set built offline from the corpus by a fixed, checkable rule.

The rule: the corpus is blocks separated by a blank line; a block whose first line is a name followed by a colon
("ROMEO:") is one speech, its text the lines after that first one (joined by newlines as they are). The `top`
speakers with the most speeches are the classes (ties broken by name); every speech of theirs is a row. Held out:
each speaker's every `every`-th speech (the `every`-th, 2·`every`-th, ... in corpus order), so both splits span
every play — a split by position would leave most speakers without held-out speeches, each play being contiguous.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from ..io import atomic_write_text

SPEAKER_LINE = re.compile(r"([A-Z][A-Za-z .'-]*):")


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) for every block of `text` that opens with a "NAME:" line and has lines after it."""
    found = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        match = SPEAKER_LINE.fullmatch(lines[0])
        if match and len(lines) > 1:
            found.append((match.group(1), "\n".join(lines[1:])))
    return found


def speaker_splits(text: str, top: int = 10, every: int = 5) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of {"text", "label"} by the rule in this module's docstring."""
    found = speeches(text)
    counts = Counter(speaker for speaker, _ in found)
    classes = {name for name, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]}
    seen: Counter = Counter()
    train, held_out = [], []
    for speaker, speech in found:
        if speaker in classes:
            seen[speaker] += 1
            (held_out if seen[speaker] % every == 0 else train).append({"text": speech, "label": speaker})
    return train, held_out


def write_speaker_tables(text: str, out: str | Path, top: int = 10, every: int = 5) -> tuple[Path, Path]:
    """Write out/train.jsonl and out/val.jsonl of the speaker rows; returns their paths."""
    out = Path(out)
    paths = out / "train.jsonl", out / "val.jsonl"
    for path, rows in zip(paths, speaker_splits(text, top, every)):
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return paths
