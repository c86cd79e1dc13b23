"""Deterministic batch order: the global batch of every step is a function of (seed, step).

That is what makes `--resume` exact and lets N processes see the same global batches as one process:
each process takes its contiguous slice of the global batch.
"""

from __future__ import annotations

import torch


class StepBatchSampler:
    """Endless index batches: micro-step m uses slice m of a seeded permutation of the dataset (per epoch)."""

    def __init__(self, dataset_size: int, batch_size: int, *, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.global_batch = batch_size * world_size
        if dataset_size < self.global_batch:
            raise ValueError(f"the dataset has {dataset_size} samples, fewer than one global batch of {self.global_batch}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.rank = rank

    def __iter__(self):
        batches_per_epoch = self.dataset_size // self.global_batch
        micro_step, epoch, order = self.start, None, None
        while True:
            batch_epoch, index = divmod(micro_step, batches_per_epoch)
            if batch_epoch != epoch:
                epoch = batch_epoch
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.dataset_size, generator=generator)
            first = index * self.global_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size].tolist()
            micro_step += 1


class FixedBatchSampler:
    """The same `num_batches` index batches at every evaluation (this process's slice of each)."""

    def __init__(self, dataset_size: int, batch_size: int, num_batches: int, *, seed: int, rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed))
        available = dataset_size // global_batch
        self.batches = []
        for index in range(min(num_batches, available)):
            first = index * global_batch + rank * batch_size
            self.batches.append(order[first : first + batch_size].tolist())
        if not self.batches and dataset_size:
            # a validation set smaller than one global batch: every process reads all of it
            self.batches = [order.tolist()]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
