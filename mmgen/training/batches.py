"""The Trainer's batches: an endless, resumable stream of training batches and the fixed validation batches, split
across processes."""

from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..data.sampling import FixedBatchSampler, StepBatchSampler
from ..errors import UserError
from .interrupts import ignore_stop_signals


class Batches:
    """DataLoaders of one run: `config` is the TrainConfig, `rank` / `world_size` this process's place."""

    def __init__(self, config, collate_fn: Callable | None, rank: int, world_size: int, pin_memory: bool):
        self.config, self.collate_fn = config, collate_fn
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory

    def train(self, dataset, step: int):
        """Endless iterator over this process's training batches, starting where step `step` left off."""
        config = self.config
        first_batch = step * config.grad_accum_steps
        if isinstance(dataset, IterableDataset):
            # a stream splits itself across processes and workers; resuming skips the batches already seen: inside
            # the stream where it can (shards skip samples without decoding them), else by reading them again
            if hasattr(dataset, "resume_after") and dataset.resume_after(first_batch, config.batch_size):
                return self._endless_stream(dataset)
            return itertools.islice(self._endless_stream(dataset), first_batch, None)
        sampler = StepBatchSampler(len(dataset), config.batch_size, seed=config.seed, start=first_batch,
                                   rank=self.rank, world_size=self.world_size)
        return iter(self.loader(dataset, sampler))

    def _endless_stream(self, dataset):
        loader = self.loader(dataset, None)
        for epoch in itertools.count():
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            batches = 0
            for batch in loader:
                batches += 1
                yield batch
            if batches == 0:
                raise UserError("the training stream yielded no complete batch: fewer usable samples than "
                                "train.batch_size (unreadable shards, if any, are named in the warnings above)")

    def validation(self, dataset):
        """The same `eval_batches` batches at every evaluation."""
        config = self.config
        if isinstance(dataset, IterableDataset):
            return itertools.islice(self.loader(dataset, None), config.eval_batches)
        sampler = FixedBatchSampler(len(dataset), config.batch_size, config.eval_batches, seed=config.seed + 1,
                                    rank=self.rank, world_size=self.world_size)
        return self.loader(dataset, sampler)

    def loader(self, dataset, sampler) -> DataLoader:
        """A DataLoader over `sampler`'s index batches, or over fixed-size batches of a stream (sampler None)."""
        workers = self.config.num_workers
        batching = {"batch_sampler": sampler} if sampler is not None else {"batch_size": self.config.batch_size,
                                                                          "drop_last": True}
        return DataLoader(
            dataset,
            **batching,
            collate_fn=self.collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=ignore_stop_signals if workers > 0 else None,  # Ctrl-C / SIGTERM are the Trainer's job
            pin_memory=self.pin_memory,
            # its own generator: creating a loader must not draw from the global RNG (exact resume needs that)
            generator=torch.Generator().manual_seed(self.config.seed + self.rank),
        )
