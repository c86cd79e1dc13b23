"""What every recipe does the same way: read and validate its config, prepare the run folder."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..config import apply_overrides, from_dict, load_yaml, to_dict
from ..errors import UserError
from ..io import atomic_write_text

RUN_CONFIG = "config.yaml"


def load_recipe_config(schema: type, config_path: str | Path | None, overrides: list[str], run_dir: Path, resume: bool):
    """Validate the recipe config; when resuming, start from the run's saved config.yaml."""
    if resume:
        saved = run_dir / RUN_CONFIG
        if not saved.is_file():
            raise UserError(f"--resume: {run_dir} is not an mmgen run folder (no {RUN_CONFIG})")
        data = load_yaml(saved)
    elif config_path is None:
        raise UserError("--config is required (or --resume RUN_DIR)")
    else:
        data = load_yaml(config_path)
    return from_dict(schema, apply_overrides(data, overrides))


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to write into a folder that already holds another run (call on every process before writing)."""
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} already holds files; continue it with --resume {run_dir} or choose another --out")


def write_run_config(run_dir: Path, config) -> None:
    """Save the resolved config as RUN_DIR/config.yaml (what --resume reads back)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RUN_CONFIG, yaml.safe_dump(to_dict(config), sort_keys=False))
