"""What a finished `mmgen train/finetune` run suggests next, filled from the run's own config.yaml.

A recipe's hint (mmgen.commands) may name {run}, {eval_data} (the `mmgen eval clip` options for the run's held-out
data) and {prompt} (an example prompt in the run's own words), so that a CLIP trained on a user's CSV is not sent to
evaluate on shapes. Importing it does not import torch.
"""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import yaml

SHAPES_PROMPT = "a large red circle in the middle"
PROMPT_PLACEHOLDER = "YOUR PROMPT"
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")


def finished_hint(hint: str, run: str, run_dir: str | Path) -> str:
    """`hint` with {run} = `run`, {eval_data} and {prompt} taken from RUN_DIR/config.yaml's data (and samples)."""
    config = _run_config(run_dir)
    return hint.format(run=run, eval_data=eval_options(config.get("data") or {}), prompt=shlex.quote(
        example_prompt(config)))


def _run_config(run_dir: str | Path) -> dict:
    from .run_folder import RunFolder  # imports torch (through mmgen.io): only once a run has finished

    path = RunFolder(run_dir).config_file
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _is_shapes(spec) -> bool:
    return isinstance(spec, str) and (spec == "shapes" or spec.startswith("shapes:"))


def eval_options(data: dict) -> str:
    """" --zeroshot-dir Z --retrieval R" for a CLIP run's data section: its own zero-shot folder and held-out
    captions (data.retrieval, else data.val); shapes specs only when the run trained on shapes."""
    on_shapes = _is_shapes(data.get("train"))

    def usable(spec) -> bool:
        return isinstance(spec, str) and bool(spec) and (on_shapes or not _is_shapes(spec))

    options = []
    if usable(data.get("zeroshot")):
        options += ["--zeroshot-dir", data["zeroshot"]]
    retrieval = next((spec for spec in (data.get("retrieval"), data.get("val")) if usable(spec)), None)
    if retrieval is not None:
        options += ["--retrieval", retrieval]
    if not options:  # nothing held out is named in the run: say what to pass
        return " --zeroshot-dir LABELLED_DIR --retrieval HELD_OUT_TABLE"
    return "".join(f" {shlex.quote(option)}" for option in options)


def example_prompt(config: dict) -> str:
    """A prompt in the run's own words: samples.prompts[0], else shapes' example for a shapes run, else the first
    caption of its data.val (or data.train) table, else a placeholder."""
    prompts = (config.get("samples") or {}).get("prompts")
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], str):
        return prompts[0]
    data = config.get("data") or {}
    if _is_shapes(data.get("train")):
        return SHAPES_PROMPT
    column = (data.get("columns") or ["image", "caption"])[-1]
    for spec in (data.get("val"), data.get("train")):
        caption = _first_caption(spec, column)
        if caption:
            return caption
    return PROMPT_PLACEHOLDER


def _first_caption(spec, column: str) -> str | None:
    """The first non-empty `column` value of a .csv/.tsv/.jsonl table, or None (not a table, unreadable)."""
    if not isinstance(spec, str) or not spec.lower().endswith(TABLE_SUFFIXES):
        return None
    path = Path(spec).expanduser()
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            if path.suffix.lower() == ".jsonl":
                rows = (json.loads(line) for line in file if line.strip())
            else:
                rows = csv.DictReader(file, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            for row in rows:
                value = row.get(column) if isinstance(row, dict) else None
                if isinstance(value, str) and value.strip():
                    return " ".join(value.split())
    except (OSError, UnicodeDecodeError, ValueError, csv.Error):
        return None
    return None
