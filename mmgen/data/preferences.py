"""Preference pairs for DPO: JSONL lines {"prompt": ..., "chosen": ..., "rejected": ...}.

The prompt is used as written (render any template into it); chosen and rejected are two completions of it. A
batch holds the chosen sequences first and the rejected ones second, each as prompt + completion with the prompt's
targets (and padding) set to IGNORE_INDEX, so a completion's log-probability never counts the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .instructions import collate_instructions

KEYS = ("prompt", "chosen", "rejected")


def read_preferences(path: str | Path) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples from a JSONL file; a missing file or a bad line is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"preference file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    triples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number}: not valid JSON ({error})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in KEYS):
            raise UserError(f"{path} line {number}: expected an object with string \"prompt\", \"chosen\" and "
                            "\"rejected\"")
        if not row["chosen"] or not row["rejected"]:
            raise UserError(f"{path} line {number}: empty completion")
        triples.append((row["prompt"], row["chosen"], row["rejected"]))
    if not triples:
        raise UserError(f"{path}: no preference pairs")
    return triples


def write_preferences(path: str | Path, triples: list[tuple[str, str, str]]) -> None:
    """Write (prompt, chosen, rejected) triples as the JSONL `read_preferences` reads."""
    lines = [json.dumps(dict(zip(KEYS, triple)), ensure_ascii=False) for triple in triples]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


class PreferencePairs(Dataset):
    """Each item: ((chosen ids, prompt length), (rejected ids, prompt length)), ids at most context_length + 1.

    A sequence longer than the window is cut at its end; a pair whose prompt alone fills the window is dropped
    (`dropped` counts them): it has no completion token left to compare."""

    def __init__(self, triples: list[tuple[str, str, str]], tokenizer, context_length: int):
        self.pairs = []
        self.dropped = 0
        for prompt, chosen, rejected in triples:
            prompt_ids = tokenizer.encode(prompt)
            if len(prompt_ids) >= context_length:
                self.dropped += 1
                continue
            self.pairs.append(tuple((torch.tensor((prompt_ids + tokenizer.encode(completion))[: context_length + 1],
                                                  dtype=torch.long), len(prompt_ids))
                                    for completion in (chosen, rejected)))
        if not self.pairs:
            raise UserError(f"every prompt is at least {context_length} tokens long, the model's context: no "
                            "completion token is left to compare")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        return self.pairs[index]


def collate_preferences(items: list) -> dict:
    """{"inputs", "targets"} (2 * batch, longest - 1): the chosen sequences, then the rejected ones (prompt masked)."""
    return collate_instructions([chosen for chosen, _ in items] + [rejected for _, rejected in items])
