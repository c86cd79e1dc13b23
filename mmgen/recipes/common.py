"""What every recipe does the same way: read and validate its config, prepare the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

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


class RecipeRun:
    """One training run of a recipe, the part every recipe's train() shares: the validated config (the run's own
    config.yaml when resuming), the run folder checked and locked, the seeded model, the Trainer.

    A recipe reads top to bottom: `run = RecipeRun.open(...)`, its data, `model = run.build_model(...)`, its objective,
    `return run.fit(model, loss_fn=..., ...)`."""

    def __init__(self, recipe, state, run_dir, resume: bool):
        self.recipe, self.state, self.folder, self.resume = recipe, state, RunFolder(run_dir), resume

    @classmethod
    def open(cls, schema: type, config_path, overrides, run_dir, resume: bool) -> "RecipeRun":
        """Validate the config (the run's own config.yaml when resuming) and claim the run folder."""
        recipe, state = open_run(schema, config_path, overrides, Path(run_dir), resume)
        return cls(recipe, state, run_dir, resume)

    @property
    def progress(self) -> bool:
        """Whether this process shows progress bars."""
        return self.recipe.train.progress and self.state.is_main_process

    def checkpoint(self) -> Path | None:
        """The checkpoint a resumed run continues from (None for a new run)."""
        return self.folder.latest() if self.resume else None

    def caption_datasets(self, image_size: int, normalize: str, shapes_options: dict | None = None, data=None):
        """`caption_datasets` of the recipe's data section (or of `data`), for this process (see the function)."""
        recipe = self.recipe
        return caption_datasets(data or recipe.data, image_size=image_size, normalize=normalize, seed=recipe.train.seed,
                                rank=self.state.process_index, world_size=self.state.num_processes,
                                num_workers=recipe.train.num_workers, progress=self.progress,
                                shapes_options=shapes_options)

    def build_model(self, fresh: Callable[[], torch.nn.Module], model_class: type | None = None) -> torch.nn.Module:
        """Write config.yaml (main process), wait for every process, seed train.seed, then build the model: `fresh()`,
        or, resuming a run with `model_class`, that class from the checkpoint's own config.json, so that a run folder
        is self-contained (a CLIP or VAE folder the fresh model was built from may be gone)."""
        from accelerate.utils import set_seed

        from ..config import from_dict
        from ..hub import read_model_config

        if self.state.is_main_process:
            write_run_config(self.folder.path, self.recipe)
        self.state.wait_for_everyone()
        set_seed(self.recipe.train.seed)
        checkpoint = self.checkpoint()
        if model_class is not None and checkpoint is not None:
            config = from_dict(model_class.config_class, read_model_config(checkpoint)["config"], "config.")
            return model_class(config)
        return fresh()

    def fit(self, model: torch.nn.Module, **options):
        """Train `model` with a Trainer on the recipe's train section (options: the Trainer's keyword arguments)."""
        from ..training import Trainer

        return Trainer(model, self.recipe.train, self.folder.path, **options).fit(resume=self.resume)


def write_run_config(run_dir: Path, config) -> None:
    """Save the resolved config as RUN_DIR/config.yaml (what --resume reads back)."""
    RunFolder(run_dir).write_config(yaml.safe_dump(to_dict(config), sort_keys=False))


def caption_datasets(data, *, image_size: int, normalize: str, seed: int, rank: int = 0, world_size: int = 1,
                     num_workers: int = 0, progress: bool = True, shapes_options: dict | None = None):
    """(train, val-or-None) raw caption datasets of a `data:` section (train, val, columns, templates, crop_scale,
    cache, and captions_per_image where the section has it); mmgen.data.robust.robust() makes them skip and count
    bad samples.

    `shapes_options` (ShapesDataset keyword arguments) apply to shapes training data only.

    With data.cache the training set is decoded once into memory (finite datasets only) as 8-bit images a little
    above `image_size` (mmgen.data.cache.CachedCaptions): random crops are still drawn per item, and bad samples
    are still counted each time they are drawn."""
    from ..data.cache import CachedCaptions
    from ..data.captions import build_caption_dataset

    options = dict(image_size=image_size, normalize=normalize, columns=data.columns, templates=data.templates,
                   crop_scale=data.crop_scale, seed=seed, rank=rank, world_size=world_size,
                   captions_per_image=getattr(data, "captions_per_image", "random"))
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
