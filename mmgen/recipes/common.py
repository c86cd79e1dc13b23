"""What every recipe does the same way: read and validate its config, prepare the run folder."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..config import apply_overrides, from_dict, load_yaml, to_dict
from ..errors import ConfigError, UserError
from ..run_folder import CONFIG_FILE as RUN_CONFIG
from ..run_folder import RunFolder, check_output_path


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
    """Refuse to write into a folder that already holds another run, that is a file or lies under one, or that
    cannot be read or created (call on every process before writing)."""
    if check_output_path(run_dir) and not resume:
        raise UserError(f"{run_dir} already holds files; continue it with --resume {run_dir} or choose another --out")


def open_run(schema: type, config_path, overrides, run_dir: Path, resume: bool):
    """(recipe, process state): the validated config, once every process has checked the run folder is usable."""
    from ..training.trainer import process_state

    recipe = load_recipe_config(schema, config_path, list(overrides), run_dir, resume)
    state = process_state()
    claim_run(Path(run_dir), resume, state)
    return recipe, state


def claim_run(run_dir: Path, resume: bool, state) -> None:
    """Check the run folder on every process, then lock it from the main process for the rest of the run (another
    run in it is refused on every process with one line) and remove what a killed run left behind."""
    check_run_dir(run_dir, resume)
    error = None
    if state.is_main_process:
        run = RunFolder(run_dir)
        try:
            run.lock()
            check_run_dir(run_dir, resume)  # again under the lock: another run may have started in between
            run.clean()
        except UserError as problem:
            run.unlock()
            error = str(problem)
    if state.num_processes > 1:
        shared = [error]
        torch.distributed.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise UserError(error)


def write_run_config(run_dir: Path, config) -> None:
    """Save the resolved config as RUN_DIR/config.yaml (what --resume reads back)."""
    RunFolder(run_dir).write_config(yaml.safe_dump(to_dict(config), sort_keys=False))


def caption_datasets(data, *, image_size: int, normalize: str, seed: int, rank: int = 0, world_size: int = 1,
                     num_workers: int = 0, progress: bool = True, shapes_options: dict | None = None):
    """(train, val-or-None) raw caption datasets of a `data:` section (train, val, columns, templates, crop_scale, cache).

    `shapes_options` (ShapesDataset keyword arguments) apply to shapes training data only.

    With data.cache the training set is decoded once into memory (finite datasets only) as 8-bit images a little
    above `image_size` (mmgen.data.cache.CachedCaptions): random crops are still drawn per item, and bad samples
    are still counted each time they are drawn."""
    from ..data.cache import CachedCaptions
    from ..data.captions import build_caption_dataset

    options = dict(image_size=image_size, normalize=normalize, columns=data.columns, templates=data.templates,
                   crop_scale=data.crop_scale, seed=seed, rank=rank, world_size=world_size)
    train_set = build_caption_dataset(data.train, split="train", train=True, shapes_options=shapes_options,
                                      **options)
    if data.cache:
        if isinstance(train_set, torch.utils.data.IterableDataset):
            raise ConfigError("data.cache needs a finite dataset (a table, a folder or shapes), not streamed shards")
        train_set = CachedCaptions(train_set, image_size, num_workers=cache_workers(len(train_set), num_workers),
                                   progress=progress, description="caching training images")
    val_set = build_caption_dataset(data.val, split="val", train=False, **options) if data.val else None
    return train_set, val_set


def cache_workers(items: int, num_workers: int, min_items: int = 4096) -> int:
    """DataLoader workers for decoding a training set into memory: train.num_workers if set, else (for sets worth
    the start-up of worker processes) one per thread torch may use, so OMP_NUM_THREADS=1 keeps it in-process."""
    if num_workers or items < min_items or torch.get_num_threads() < 2:
        return num_workers
    return torch.get_num_threads()


def robust(dataset):
    """`dataset` with bad samples replaced (map-style) or skipped (streams), and counted either way."""
    from ..data.robust import ReplaceBadSamples, SkipBadSamplesInStream

    if isinstance(dataset, torch.utils.data.IterableDataset):
        return SkipBadSamplesInStream(dataset)
    return ReplaceBadSamples(dataset)
