"""InMemoryCaptions: a finite caption set decoded once; worker processes decode the same items in the same order."""

import pytest
import torch

from mmgen.data.cache import InMemoryCaptions
from mmgen.data.shapes import ShapesDataset
from mmgen.errors import UserError
from mmgen.recipes.common import cache_workers


def test_workers_decode_the_same_items_in_order():
    dataset = ShapesDataset("train", 40, 16, seed=4)
    alone = InMemoryCaptions(dataset, batch_size=8, progress=False)
    with_workers = InMemoryCaptions(dataset, num_workers=2, batch_size=8, progress=False)
    assert len(alone) == 40 and alone.captions == with_workers.captions
    assert torch.equal(alone.images, with_workers.images) and torch.equal(alone.labels, with_workers.labels)
    assert alone[5]["caption"] == dataset[5]["caption"] and torch.equal(alone[5]["image"], dataset[5]["image"])


def test_no_usable_sample_is_a_user_error():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return None  # what a bad sample becomes before robust replacement

    with pytest.raises(UserError, match="no usable samples"):
        InMemoryCaptions(Broken(), progress=False)


def test_cache_workers_follow_the_thread_budget(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cache_workers(40000, 0) == 2  # big set, threads to spare: decode in parallel
    assert cache_workers(100, 0) == 0  # small set: worker start-up would cost more than it saves
    assert cache_workers(40000, 3) == 3  # the user's train.num_workers wins
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cache_workers(40000, 0) == 0  # OMP_NUM_THREADS=1: stay in-process
