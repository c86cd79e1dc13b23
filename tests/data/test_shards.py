"""WebDataset shards: read back completely, split over processes and DataLoader workers without overlap."""

import io
import itertools
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import mmgen.data.shards as shards_module
from mmgen.data.captions import WebDatasetShards, build_caption_dataset
from mmgen.data.robust import BadSample, collate_captions
from mmgen.errors import UserError

from .helpers import image_bytes, random_caption, random_image, write_shard


def make_shards(folder, rng, count, per_shard=(2, 6)):
    """`count` shards of a random number of samples each (jpg or png); returns their paths and all captions."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, captions = [], []
    for shard in range(count):
        samples = []
        for index in range(int(rng.integers(*per_shard))):
            extension = "jpg" if rng.random() < 0.5 else "png"
            image = random_image(rng, "RGB")
            caption = random_caption(rng)
            samples.append((f"s{shard:03d}/{index:05d}", image_bytes(image, "JPEG" if extension == "jpg" else "PNG"),
                            extension, caption))
            captions.append(caption)
        path = folder / f"shard-{shard:03d}.tar"
        write_shard(path, samples)
        paths.append(path)
    return paths, captions


def sample_count(shard) -> int:
    with tarfile.open(shard) as archive:
        return len(archive.getmembers()) // 2  # an image and a caption each


def read_captions(dataset):
    """One pass: all of an evaluation stream, the first epoch of an (endless) training stream."""
    dataset.endless = False
    return [item["caption"] for item in dataset]


def test_shards_are_read_back_completely_from_a_file_a_folder_or_a_pattern(tmp_path):
    rng = np.random.default_rng(0)
    paths, captions = make_shards(tmp_path / "shards", rng, count=3)
    folder = build_caption_dataset(str(tmp_path / "shards"), image_size=16, train=False)
    assert isinstance(folder, WebDatasetShards)
    items = list(folder)
    assert [item["caption"] for item in items] == captions  # file order when not training
    assert all(item["image"].shape == (3, 16, 16) for item in items)
    pattern = build_caption_dataset(str(tmp_path / "shards" / "shard-{000..002}.tar"), train=False)
    assert read_captions(pattern) == captions
    single = build_caption_dataset(str(paths[1]), train=False)
    first = sample_count(paths[0])
    assert read_captions(single) == captions[first : first + sample_count(paths[1])]


def test_training_streams_are_shuffled_but_complete(tmp_path):
    rng = np.random.default_rng(1)
    make_shards(tmp_path, rng, count=4, per_shard=(5, 8))
    dataset = build_caption_dataset(str(tmp_path), image_size=8, train=True)
    first, again = read_captions(dataset), read_captions(dataset)
    in_file_order = read_captions(build_caption_dataset(str(tmp_path), image_size=8, train=False))
    assert first == again and sorted(first) == sorted(in_file_order) and first != in_file_order
    dataset.endless = True
    two_epochs = [item["caption"] for item in itertools.islice(dataset, 2 * len(first))]
    dataset.set_epoch(1)
    second = read_captions(dataset)
    assert second != first and second == two_epochs[len(first):]  # endless: epoch after epoch


def test_missing_shards_in_a_pattern_are_a_user_error(tmp_path):
    make_shards(tmp_path, np.random.default_rng(2), count=2)
    with pytest.raises(UserError, match="1 of the 3 shards.*shard-002.tar"):
        build_caption_dataset(str(tmp_path / "shard-{000..002}.tar"))


def read_as(dataset, monkeypatch, rank_workers):
    """What each (rank, worker) reader yields, simulating DataLoader workers through get_worker_info."""
    rank, workers, worker_id = rank_workers
    dataset.rank = rank
    monkeypatch.setattr(shards_module, "get_worker_info",
                        lambda: SimpleNamespace(num_workers=workers, id=worker_id))
    return read_captions(dataset)


@pytest.mark.parametrize("shard_count", [7, 2])  # more shards than the 4 readers, and fewer
@pytest.mark.parametrize("train", [False, True])
def test_two_ranks_times_two_workers_read_disjoint_parts_and_lose_nothing(tmp_path, monkeypatch, shard_count, train):
    rng = np.random.default_rng(shard_count)
    paths, captions = make_shards(tmp_path, rng, count=shard_count)
    parts = []
    for rank, worker in itertools.product(range(2), range(2)):
        dataset = build_caption_dataset(str(tmp_path), image_size=8, train=train, rank=rank, world_size=2)
        parts.append(read_as(dataset, monkeypatch, (rank, 2, worker)))
    assert sorted(itertools.chain(*parts)) == sorted(captions)  # nothing lost, nothing twice
    assert all(parts)  # every reader gets work
    if shard_count >= 4:  # whole shards per reader: a reader's samples come from its own shards
        shard_of = {}
        for path in paths:
            with tarfile.open(path) as archive:
                for member in archive:
                    if member.name.endswith(".txt"):
                        shard_of[archive.extractfile(member).read().decode()] = path
        owners = [{shard_of[caption] for caption in part} for part in parts]
        assert sum(len(owner) for owner in owners) == shard_count


def test_a_real_dataloader_with_two_workers(tmp_path):
    _, captions = make_shards(tmp_path, np.random.default_rng(3), count=3)
    dataset = build_caption_dataset(str(tmp_path), image_size=8, train=False)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_captions)
    batches = list(loader)
    assert sorted(caption for batch in batches for caption in batch["captions"]) == sorted(captions)
    assert all(batch["images"].shape[1:] == (3, 8, 8) for batch in batches)


def test_damaged_shards_and_incomplete_samples_are_bad_samples(tmp_path):
    rng = np.random.default_rng(4)
    paths, captions = make_shards(tmp_path, rng, count=2, per_shard=(4, 5))
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])  # cut mid-shard
    with tarfile.open(paths[1], "a") as archive:  # an image without a caption
        info = tarfile.TarInfo("lonely.png")
        payload = image_bytes(random_image(rng, "RGB"), "PNG")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    items = list(WebDatasetShards(paths, lambda image: torch.zeros(3, 2, 2)))
    bad = [item for item in items if isinstance(item, BadSample)]
    good = [item["caption"] for item in items if isinstance(item, dict)]
    assert {item.reason.split(":")[0] for item in bad} == {"unreadable shard", "no .txt caption"}
    assert set(captions[4:]) <= set(good) and set(good) < set(captions)
