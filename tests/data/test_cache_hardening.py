"""The training cache (CachedCaptions): bad samples counted as without it, crops drawn per item, 8-bit storage."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from mmgen.data.cache import CachedCaptions, InMemoryCaptions
from mmgen.data.captions import build_caption_dataset
from mmgen.data.images import normalization, tensor_transform
from mmgen.data.robust import (
    BadSample,
    BadSampleTracker,
    ReplaceBadSamples,
    collate_captions,
    robust,
)
from mmgen.data.sampling import StepBatchSampler
from mmgen.data.shapes import ShapesDataset
from mmgen.errors import UserError
from mmgen.recipes.common import caption_datasets

from .helpers import random_caption, random_image, write_table


def make_table(folder, good: int, missing: range, size=None, seed: int = 0):
    """A CSV of `good` + len(missing) rows whose rows at the indices `missing` name files that do not exist."""
    rng = np.random.default_rng(seed)
    rows, images = [], iter(range(good))
    for row in range(good + len(missing)):
        if row in missing:
            rows.append({"image": f"gone-{row}.png", "caption": random_caption(rng)})
            continue
        name = f"good-{next(images)}.png"
        random_image(rng, "RGB", size).save(folder / name)
        rows.append({"image": name, "caption": random_caption(rng)})
    write_table(folder / "table.csv", rows)
    return folder / "table.csv"


def data_section(table, cache: bool, crop_scale=(0.9, 1.0)):
    return SimpleNamespace(train=str(table), val=None, columns=("image", "caption"), templates=None,
                           crop_scale=crop_scale, cache=cache)


def one_pass(dataset, batch_size: int = 8) -> list[dict]:
    """Every index once, in order, batched as the recipes batch (bad samples replaced and counted)."""
    return list(DataLoader(ReplaceBadSamples(dataset), batch_size=batch_size, collate_fn=collate_captions))


@pytest.mark.parametrize("cache", [False, True])
def test_consecutive_bad_rows_are_counted_once_per_pass(tmp_path, cache):
    table = make_table(tmp_path, good=24, missing=range(10, 18))
    train_set, _ = caption_datasets(data_section(table, cache), image_size=16, normalize="clip", seed=0,
                                    progress=False)
    batches = one_pass(train_set)
    assert sum(batch["skipped"] for batch in batches) == 8  # was 8 + 7 + ... + 1 = 36: each also counted its followers
    assert [len(batch["captions"]) for batch in batches] == [8] * 4  # batches stay full: bad rows are replaced
    tracker = BadSampleTracker(max_bad_fraction=0.5, log=lambda message: None)
    for batch in batches:
        tracker.update(batch)
    assert (tracker.seen, tracker.skipped) == (32, 8)  # 32 rows drawn, 8 of them bad
    assert batches[1]["skipped_examples"][:2] == [f"{tmp_path}/gone-10.png (missing)",
                                                  f"{tmp_path}/gone-11.png (missing)"]


def test_the_cache_keeps_bad_samples_where_they_were(tmp_path):
    table = make_table(tmp_path, good=6, missing=range(2, 4))
    cached = CachedCaptions(build_caption_dataset(str(table), image_size=16), 16, progress=False)
    assert len(cached) == 8 and cached.skipped == 2
    assert [isinstance(cached[i], BadSample) for i in range(8)] == [False, False, True, True] + [False] * 4
    assert str(cached[3]) == f"{tmp_path}/gone-3.png (missing)"


def test_an_evaluation_set_names_the_samples_it_leaves_out(tmp_path, capsys):
    table = make_table(tmp_path, good=3, missing=[1])
    items = InMemoryCaptions(build_caption_dataset(str(table), image_size=8, train=False), progress=False,
                             description="zero-shot images")
    assert len(items) == 3 and items.skipped == 1
    assert f"zero-shot images: 1 of 4 samples are unreadable and left out, e.g. {tmp_path}/gone-1.png (missing)" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("cache", [False, True])
def test_mostly_missing_files_stop_training_with_or_without_the_cache(tmp_path, cache):
    missing = [row for row in range(200) if row % 20]  # 190 of 200 files are missing, the good ones spread out
    table = make_table(tmp_path, good=10, missing=missing, size=(12, 12))
    train_set, _ = caption_datasets(data_section(table, cache), image_size=8, normalize="clip", seed=0,
                                    progress=False)
    sampler = StepBatchSampler(len(train_set), 16, seed=0)
    loader = DataLoader(robust(train_set), batch_sampler=sampler, collate_fn=collate_captions)
    tracker = BadSampleTracker(max_bad_fraction=0.01, log=lambda message: None)
    with pytest.raises(UserError, match=r"of \d+ samples were unreadable .*data.max_bad_fraction"):
        for batch in itertools.islice(loader, 20):
            tracker.update(batch)
    assert tracker.skipped > 0.9 * tracker.seen  # a replacement stands in for a bad draw: not counted twice


def test_cached_images_are_8_bit_a_little_above_the_model_size_and_keep_their_shape(tmp_path):
    table = make_table(tmp_path, good=3, missing=range(0), size=(60, 40))
    dataset = build_caption_dataset(str(table), image_size=16)
    cached = CachedCaptions(dataset, 16, progress=False)
    assert cached.pixels.dtype == torch.uint8
    assert cached.sizes.tolist() == [[19, 28]] * 3  # shorter side ceil(16 * 8 / 7) = 19, aspect 3:2 kept
    assert cached.pixels.numel() == 3 * 19 * 28 * 3  # 4.8 KB per image instead of 60x40 decoded or 6 KB of float32
    assert cached[0]["image"].shape == (3, 16, 16) and cached[0]["image"].dtype == torch.float32


def test_each_read_draws_a_new_crop_reproducibly_from_the_seed(tmp_path):
    table = make_table(tmp_path, good=4, missing=range(0), size=(48, 48))
    dataset = build_caption_dataset(str(table), image_size=16, crop_scale=(0.2, 0.4))
    cached = CachedCaptions(dataset, 16, progress=False)
    torch.manual_seed(3)
    first, second = cached[1]["image"], cached[1]["image"]
    assert not torch.equal(first, second)  # a frozen crop would give the same image every epoch
    torch.manual_seed(3)
    assert torch.equal(cached[1]["image"], first)
    # the crop is of the whole picture: the mean colour of many crops is close to the uncached ones'
    torch.manual_seed(0)
    with_cache = torch.stack([cached[1]["image"] for _ in range(200)]).mean(dim=(0, 2, 3))
    without = torch.stack([dataset[1]["image"] for _ in range(200)]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(with_cache, without, atol=0.05, rtol=0)


def test_cached_shapes_equal_the_rendered_items_bit_for_bit_with_workers_too():
    dataset = ShapesDataset("train", 24, 16, seed=1, partial_captions=0.5)  # some items are grey
    alone = CachedCaptions(dataset, 16, batch_size=5, progress=False)
    with_workers = CachedCaptions(dataset, 16, num_workers=2, batch_size=5, progress=False)
    assert torch.equal(alone.pixels, with_workers.pixels) and alone.captions == with_workers.captions
    assert alone.pixels.numel() == 24 * 3 * 16 * 16  # rendered at the model size: stored as it is, 1 byte a value
    for index in range(24):
        item, rendered = alone[index], dataset[index]
        assert torch.equal(item["image"], rendered["image"]), index
        assert (item["caption"], item["label"]) == (rendered["caption"], rendered["label"])


@pytest.mark.parametrize("normalize", ["clip", "minus_one_to_one"])
def test_the_shapes_transform_is_torchvisions_bit_for_bit(normalize):
    reference = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), normalization(normalize)])
    dataset = ShapesDataset("train", 8, 16, seed=2)
    for index in range(8):
        image = dataset.image(index)
        expected = reference(image)
        assert torch.equal(tensor_transform(normalize)(image), expected)
        assert torch.equal(tensor_transform(normalize)(v2.functional.pil_to_tensor(image)), expected)


def test_batches_from_the_cache_are_reproducible_with_loader_workers(tmp_path):
    table = make_table(tmp_path, good=16, missing=range(0), size=(40, 30))
    cached = CachedCaptions(build_caption_dataset(str(table), image_size=16, crop_scale=(0.3, 0.6)), 16,
                            progress=False)

    def batches():
        sampler = StepBatchSampler(len(cached), 8, seed=0)
        loader = DataLoader(cached, batch_sampler=sampler, collate_fn=collate_captions, num_workers=2,
                            generator=torch.Generator().manual_seed(0))
        return [batch["images"] for batch in itertools.islice(loader, 4)]

    first, again = batches(), batches()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0].sort(dim=0).values, first[2].sort(dim=0).values)  # epoch 2: new crops
