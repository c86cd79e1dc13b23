"""Hold out part of a user's own caption table: a fixed, seeded train/val split, stratified by a column if asked.

`mmgen split-data pairs.csv --val-fraction 0.1` writes pairs.train.csv and pairs.val.csv beside the table (so relative
image paths stay valid), for data.train / data.val / data.retrieval. Imports no torch.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import UserError

SPLIT_SUFFIXES = (".csv", ".tsv", ".jsonl")


def split_indices(count: int, val_fraction: float, seed: int = 0,
                  groups: Sequence[Hashable] | None = None) -> tuple[list[int], list[int]]:
    """(train indices, val indices), both sorted: within each group (all items one group if `groups` is None, else
    in sorted group order) the items are shuffled with `seed` and the first round(val_fraction * size) held out,
    at least one and never the whole group; a group of one item stays in train."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"the held-out fraction must lie in (0, 1), got {val_fraction}")
    if groups is not None and len(groups) != count:
        raise ValueError(f"{len(groups)} group keys for {count} items")
    members: dict = {}
    for index, key in enumerate(groups if groups is not None else [0] * count):
        members.setdefault(key, []).append(index)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for key in sorted(members):
        if len(members[key]) < 2:
            continue
        shuffled = rng.permutation(members[key])
        val += shuffled[: min(len(shuffled) - 1, max(1, round(val_fraction * len(shuffled))))].tolist()
    held_out = set(val)
    return [index for index in range(count) if index not in held_out], sorted(held_out)


class TableSplit(NamedTuple):
    """The two tables split_table wrote and how many rows each holds."""

    train: Path
    val: Path
    train_rows: int
    val_rows: int


def split_table(path: str | Path, *, val_fraction: float = 0.1, seed: int = 0,
                stratify: str | None = None) -> TableSplit:
    """Write TABLE.train.SUFFIX and TABLE.val.SUFFIX beside a .csv/.tsv/.jsonl table (rows in their order),
    holding out `val_fraction` of the rows (of each value of column `stratify`, if given). Refuses to overwrite."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SPLIT_SUFFIXES:
        raise UserError(f"{path}: expected a .csv, .tsv or .jsonl table")
    if not path.is_file():
        raise UserError(f"table not found: {path}")
    outputs = [path.with_name(f"{path.stem}.{split}{path.suffix}") for split in ("train", "val")]
    for output in outputs:
        if output.exists():
            raise UserError(f"{output} already exists; remove it or split another copy of the table")
    header, rows, keys = _read_jsonl(path, stratify) if suffix == ".jsonl" else _read_delimited(path, stratify)
    if len(rows) < 2:
        raise UserError(f"{path}: {len(rows)} row(s); a train/val split needs at least 2")
    train, val = split_indices(len(rows), val_fraction, seed, keys)
    if not val:
        raise UserError(f"{path}: no row could be held out (every {stratify} value has one row)")
    for output, indices in zip(outputs, (train, val)):
        temporary = output.with_name(f".{output.name}.tmp")
        with open(temporary, "w", encoding="utf-8", newline="") as file:
            if suffix == ".jsonl":
                file.writelines(rows[index] for index in indices)
            else:
                writer = _csv_writer(file, suffix)
                writer.writerow(header)
                writer.writerows(rows[index] for index in indices)
        temporary.replace(output)
    return TableSplit(outputs[0], outputs[1], len(train), len(val))


def _delimiter(suffix: str) -> dict:
    # like mmgen.data.captions: TSV files are rarely quoted, so quotes are plain characters there
    if suffix == ".tsv":
        return {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "quotechar": None}
    return {"delimiter": ","}


def _csv_writer(file, suffix: str):
    return csv.writer(file, lineterminator="\n", **_delimiter(suffix))


def _read_delimited(path: Path, stratify: str | None) -> tuple[list[str], list[list[str]], list[str] | None]:
    """(header, non-empty rows, each row's `stratify` value or None) of a .csv / .tsv table."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            table = [row for row in csv.reader(file, **_delimiter(path.suffix.lower())) if any(cell.strip()
                                                                                             for cell in row)]
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except csv.Error as error:
        raise UserError(f"{path}: not a valid table ({error})") from None
    if not table:
        raise UserError(f"{path}: the table is empty")
    header, rows = table[0], table[1:]
    if stratify is None:
        return header, rows, None
    if stratify not in header:
        raise UserError(f"{path}: no column {stratify!r} to stratify by (it has {', '.join(map(repr, header))})")
    position = header.index(stratify)
    return header, rows, [row[position] if position < len(row) else "" for row in rows]


def _read_jsonl(path: Path, stratify: str | None) -> tuple[None, list[str], list[str] | None]:
    """(None, the non-empty lines verbatim, each line's `stratify` value as JSON text or None) of a .jsonl file."""
    try:
        lines = [line if line.endswith("\n") else line + "\n"
                 for line in path.read_text(encoding="utf-8-sig").splitlines(keepends=True) if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if stratify is None:
        return None, lines, None
    keys = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} row {number}: not valid JSON") from None
        if not isinstance(row, dict) or stratify not in row:
            raise UserError(f"{path} row {number}: no key {stratify!r} to stratify by")
        keys.append(json.dumps(row[stratify], sort_keys=True))
    return None, lines, keys
