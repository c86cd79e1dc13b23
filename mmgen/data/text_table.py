"""Labelled text tables (a .csv / .tsv / .jsonl file of text,label rows) for sequence classifiers."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .captions import TABLE_FORMATS, _read_table


def read_labelled_texts(path: str | Path, text_column: str = "text", label_column: str = "label"
                        ) -> list[tuple[str, str]]:
    """(text, label) rows of a table; a missing file or column, an empty text or label is one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix.lower() not in TABLE_FORMATS and path.suffix.lower() != ".jsonl":
        raise UserError(f"{path}: expected a .csv, .tsv or .jsonl table of {text_column},{label_column} rows")
    header, rows = _read_table(path)
    if not rows:
        raise UserError(f"{path}: the table has no rows")
    for column in (text_column, label_column):
        if column not in header:
            raise UserError(f"{path}: no column {column!r} (it has {', '.join(map(repr, header))}); set "
                            "data.text_column and data.label_column")
    pairs = []
    for number, row in enumerate(rows, 1):
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str) or not text:
            raise UserError(f"{path} row {number}: no text in column {text_column!r}")
        if label is None or str(label).strip() == "":
            raise UserError(f"{path} row {number}: no label in column {label_column!r}")
        pairs.append((text, str(label).strip()))
    return pairs


def class_names(labels: list[str], source) -> list[str]:
    """The sorted distinct labels; fewer than two is a UserError (nothing to classify)."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UserError(f"{source}: every row has the label {classes[0]!r}; a classifier needs at least two classes")
    return classes


class LabelledTexts(torch.utils.data.Dataset):
    """Token ids (the first `max_tokens` of each text) and class indices."""

    def __init__(self, pairs: list[tuple[str, str]], tokenizer, classes: list[str], max_tokens: int, source):
        index = {name: i for i, name in enumerate(classes)}
        self.items = []
        for number, (text, label) in enumerate(pairs, 1):
            if label not in index:
                raise UserError(f"{source} row {number}: label {label!r} is not one of the training classes "
                                f"({', '.join(classes)})")
            try:
                ids = tokenizer.encode(text)[:max_tokens]
            except UserError as error:
                raise UserError(f"{source} row {number}: {error}") from None
            if not ids:
                raise UserError(f"{source} row {number}: the text encodes to no tokens")
            self.items.append((torch.tensor(ids, dtype=torch.long), index[label]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def collate_texts(batch) -> dict:
    """Right-pad token ids to the longest in the batch: tokens, padding_mask (True = padding), labels."""
    length = max(len(ids) for ids, _ in batch)
    tokens = torch.zeros(len(batch), length, dtype=torch.long)
    padding_mask = torch.ones(len(batch), length, dtype=torch.bool)
    for row, (ids, _) in enumerate(batch):
        tokens[row, : len(ids)] = ids
        padding_mask[row, : len(ids)] = False
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    return {"tokens": tokens, "padding_mask": padding_mask, "labels": labels}
