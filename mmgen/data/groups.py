"""Keep groups of consecutive items together in a batch (hard negatives for contrastive training)."""

from __future__ import annotations

from torch.utils.data import Dataset


class GroupedItems(Dataset):
    """Item j is the list of items [j * group_size, (j + 1) * group_size) of `dataset`; collate_captions flattens it.

    With a dataset whose consecutive items differ in one attribute only (ShapesDataset's `group_size`), every batch
    then holds negatives that only that attribute tells apart. A batch of B groups holds B * group_size samples."""

    def __init__(self, dataset: Dataset, group_size: int):
        self.dataset = dataset
        self.group_size = group_size

    def __len__(self) -> int:
        return len(self.dataset) // self.group_size

    def __getitem__(self, index: int) -> list:
        first = index * self.group_size
        return [self.dataset[first + member] for member in range(self.group_size)]
