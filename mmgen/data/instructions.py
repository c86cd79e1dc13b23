"""Instruction tuning data: JSONL lines {"instruction": ..., "response": ...} rendered with a prompt template.

The model reads template-with-instruction + response + suffix and learns to predict only the response (and the
suffix, which teaches it where to stop): prompt positions get the ignore index in the targets, so the loss never
asks the model to reproduce the instructions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import UserError

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
PLACEHOLDER = "{instruction}"
DEFAULT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


def check_template(template: str) -> str:
    """`template` if it holds {instruction} exactly once, else a UserError."""
    if template.count(PLACEHOLDER) != 1:
        raise UserError(f"prompt template {template!r} must contain {PLACEHOLDER} exactly once")
    return template


def render_prompt(template: str, instruction: str) -> str:
    """The prompt for `instruction`: the template with {instruction} replaced (other braces are left alone)."""
    return check_template(template).replace(PLACEHOLDER, instruction)


def read_instructions(path: str | Path) -> list[tuple[str, str]]:
    """(instruction, response) pairs from a JSONL file; a missing file or a bad line is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"instruction file not found: {path}")
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number}: not valid JSON ({error})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("instruction", "response")):
            raise UserError(f"{path} line {number}: expected an object with string \"instruction\" and \"response\"")
        if not row["response"]:
            raise UserError(f"{path} line {number}: empty response")
        pairs.append((row["instruction"], row["response"]))
    if not pairs:
        raise UserError(f"{path}: no instruction/response pairs")
    return pairs


class InstructionExamples(Dataset):
    """Token ids (at most context_length + 1) of prompt + response + suffix, with the prompt's length.

    An example longer than the window is cut at its end; one whose prompt alone fills the window is dropped
    (`dropped` counts them), since it has no response token left to learn from."""

    def __init__(self, pairs: list[tuple[str, str]], tokenizer, template: str, context_length: int,
                 response_suffix: str = ""):
        self.examples: list[tuple[torch.Tensor, int]] = []
        self.dropped = self.truncated = 0
        for instruction, response in pairs:
            prompt = tokenizer.encode(render_prompt(template, instruction))
            ids = prompt + tokenizer.encode(response + response_suffix)
            if len(prompt) >= context_length:
                self.dropped += 1
                continue
            self.truncated += len(ids) > context_length + 1
            self.examples.append((torch.tensor(ids[: context_length + 1], dtype=torch.long), len(prompt)))
        if not self.examples:
            raise UserError(f"every prompt is at least {context_length} tokens long, the model's context: no "
                            "response token is left to train on (shorten the template or the instructions)")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.examples[index]


def collate_instructions(items: list[tuple[torch.Tensor, int]], pad_id: int = 0) -> dict:
    """{"inputs": (batch, longest - 1) ids, "targets": the next ids with prompt and padding set to IGNORE_INDEX}."""
    length = max(len(ids) for ids, _ in items) - 1
    inputs = torch.full((len(items), length), pad_id, dtype=torch.long)
    targets = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(items):
        inputs[row, : len(ids) - 1] = ids[:-1]
        targets[row, : len(ids) - 1] = ids[1:]
        targets[row, : prompt_length - 1] = IGNORE_INDEX  # position j predicts token j + 1: the prompt's own tokens
    return {"inputs": inputs, "targets": targets}
