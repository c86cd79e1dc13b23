"""Shards through the webdataset library: pipe: commands and URLs, img2dataset-style samples, several captions per
image, and resuming a training stream mid-epoch without decoding the samples already seen."""

import io
import itertools
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mmgen.data.shards as shards_module
from mmgen.data.captions import WebDatasetShards, build_caption_dataset
from mmgen.data.robust import BadSample, collate_captions, robust
from mmgen.data.shards import expand_braces, open_shard, shard_list
from mmgen.errors import UserError
from mmgen.training.batches import Batches

from .helpers import image_bytes, random_caption, random_image, write_shard


def write_members(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def make_shards(folder, count, per_shard, seed=0):
    """`count` shards of `per_shard` png + txt samples; their paths and all captions in file order."""
    rng = np.random.default_rng(seed)
    paths, captions = [], []
    for shard in range(count):
        samples = [(f"{shard}-{i:03d}", image_bytes(random_image(rng, "RGB", (6, 6)), "PNG"), "png",
                    random_caption(rng) + f" {shard}-{i}") for i in range(per_shard)]
        write_shard(folder / f"part-{shard:02d}.tar", samples)
        paths.append(folder / f"part-{shard:02d}.tar")
        captions += [caption for *_, caption in samples]
    return paths, captions


def captions_of(items):
    return [item["caption"] for item in items]


def test_a_pipe_command_reads_like_the_file_and_a_failing_one_is_a_bad_shard(tmp_path, capsys):
    paths, captions = make_shards(tmp_path, 2, 3)
    piped = build_caption_dataset(f"pipe:cat {tmp_path}/part-{{00..01}}.tar", image_size=8, train=False)
    assert isinstance(piped, WebDatasetShards) and captions_of(piped) == captions
    items = list(build_caption_dataset(f"pipe:cat {tmp_path}/nowhere.tar", image_size=8, train=False))
    assert len(items) == 1 and isinstance(items[0], BadSample) and items[0].reason.startswith("unreadable shard")
    assert "nowhere.tar" in capsys.readouterr().err


def test_urls_are_expanded_not_checked_and_s3_goes_through_the_aws_cli(monkeypatch):
    assert shard_list("https://host/data/s-{008..010}.tar") == [f"https://host/data/s-{i:03d}.tar" for i in (8, 9, 10)]
    assert expand_braces("a-{0..1}.tar::b.tar") == ["a-0.tar", "a-1.tar", "b.tar"]
    with pytest.raises(UserError, match="bad range"):
        shard_list("https://host/s-{9..2}.tar")
    opened = []
    monkeypatch.setattr(shards_module.webdataset, "gopen", lambda url, mode: opened.append(url))
    open_shard("s3://bucket/shard-0.tar")
    open_shard("https://host/shard-0.tar")
    assert opened == ["pipe:aws s3 cp s3://bucket/shard-0.tar -", "https://host/shard-0.tar"]


def test_img2dataset_samples_are_read_as_they_come(tmp_path):
    rng = np.random.default_rng(1)
    image = random_image(rng, "RGB", (7, 5))
    meta = {"url": "http://x/1.jpg", "key": "000000001", "status": "success"}
    write_members(tmp_path / "00000.tar", [
        ("000000000.jpg", image_bytes(image, "JPEG")), ("000000000.txt", b"a jpeg with text"),
        ("000000000.json", json.dumps({**meta, "caption": "ignored: the .txt wins"}).encode()),
        ("000000001.webp", image_bytes(image, "WEBP")), ("000000001.json", json.dumps({**meta, "caption": "a webp"}).encode()),
        ("000000002.png", image_bytes(image, "PNG")), ("000000002.json", json.dumps(meta).encode()),
        ("000000003.txt", b"no image"),
    ])
    items = list(build_caption_dataset(str(tmp_path / "00000.tar"), image_size=8, train=False))
    assert captions_of(items[:2]) == ["a jpeg with text", "a webp"]
    assert all(item["image"].shape == (3, 8, 8) for item in items[:2])
    assert [(bad.source.rsplit(":", 1)[1], bad.reason) for bad in items[2:]] == [
        ("000000002", "no caption in the .json"), ("000000003", "no image file")]


def test_several_captions_per_image_one_drawn_per_sample_by_a_seeded_rng(tmp_path):
    rng = np.random.default_rng(2)
    members = []
    for index in range(40):  # every caption drawn: fails with probability 3 * (2/3)**40 (the draw follows tmp_path)
        members.append((f"{index:02d}.png", image_bytes(random_image(rng, "RGB", (4, 4)), "PNG")))
        choices = [f"caption {index} {c}" for c in "abc"]
        members.append((f"{index:02d}.txt", "\n".join(choices).encode()) if index % 2 else
                       (f"{index:02d}.json", json.dumps(choices).encode()))
    write_members(tmp_path / "multi.tar", members)

    def drawn(train, seed=0, choice="random"):
        dataset = build_caption_dataset(str(tmp_path / "multi.tar"), image_size=4, train=train, seed=seed,
                                        captions_per_image=choice)
        dataset.endless = False
        return sorted(captions_of(dataset))

    random_draws = drawn(True)
    assert random_draws == drawn(True)  # seeded
    assert {caption.split()[-1] for caption in random_draws} == {"a", "b", "c"}  # every caption gets drawn
    assert random_draws != drawn(True, seed=1)
    assert {caption.split()[-1] for caption in drawn(True, choice="first") + drawn(False)} == {"a"}
    every = build_caption_dataset(str(tmp_path / "multi.tar"), image_size=4, captions_per_image="all")
    every.endless = False
    assert sorted(item["caption"] for item in every) == drawn(False)  # "caption" is the first, "captions" all
    assert sorted(caption for item in every for caption in item["captions"]) == sorted(
        f"caption {index} {c}" for index in range(40) for c in "abc")
    with pytest.raises(UserError, match="captions_per_image"):
        build_caption_dataset(str(tmp_path / "multi.tar"), captions_per_image="every")


class CountingTransform:
    """Counts the images decoded (the transform runs once per decoded image)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).mean().reshape(1)


def training_batches(paths, step, workers, transform=None, batch_size=3, accumulation=2):
    dataset = WebDatasetShards(paths, transform or CountingTransform(), seed=7, shuffle_buffer=5)
    config = SimpleNamespace(batch_size=batch_size, grad_accum_steps=accumulation, seed=7, num_workers=workers)

    def collate(items):
        batch = collate_captions(items)
        return {"captions": batch["captions"], "skipped": batch["skipped"]}

    return Batches(config, collate, rank=0, world_size=1, pin_memory=False).train(robust(dataset), step)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_yields_exactly_what_an_uninterrupted_one_would(tmp_path, workers):
    paths, captions = make_shards(tmp_path, 5, 4, seed=3)
    with tarfile.open(paths[2], "a") as archive:  # a sample without a caption: counted once, in either run
        payload = image_bytes(random_image(np.random.default_rng(0), "RGB", (4, 4)), "PNG")
        info = tarfile.TarInfo("orphan.png")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    steps, later = 5, 6  # 5 steps x 2 micro-batches of 3 = 30 items: past the first epoch of 20
    uninterrupted = list(itertools.islice(training_batches(paths, 0, workers), 2 * (steps + later)))
    resumed = list(itertools.islice(training_batches(paths, steps, workers), 2 * later))
    assert resumed == uninterrupted[2 * steps:]
    assert sum(batch["skipped"] for batch in resumed) >= 1  # the orphan, counted again in a later epoch
    assert sum(batch["skipped"] for batch in uninterrupted[:2 * steps]) == 1  # once per epoch, not per skip
    first_epoch = [caption for batch in uninterrupted for caption in batch["captions"]][:len(captions)]
    if workers == 0:
        assert sorted(first_epoch) == sorted(captions)


def test_resuming_decodes_none_of_the_skipped_samples(tmp_path):
    paths, _ = make_shards(tmp_path, 3, 4, seed=4)
    transform = CountingTransform()
    batch = next(training_batches(paths, step=3, workers=0, transform=transform))
    assert transform.calls == 3  # one batch, not the 3 x 2 skipped before it
    assert batch == list(itertools.islice(training_batches(paths, step=0, workers=0), 7))[6]


def test_an_evaluation_stream_cannot_skip_inside_and_is_not_endless(tmp_path):
    paths, captions = make_shards(tmp_path, 2, 3, seed=5)
    dataset = build_caption_dataset(str(tmp_path), image_size=4, train=False)
    assert dataset.resume_after(4, 2) is False and captions_of(dataset) == captions


def test_the_config_key_reaches_the_shards_and_is_validated(tmp_path):
    from mmgen.config import from_dict
    from mmgen.errors import ConfigError
    from mmgen.recipes.clip import CLIPRecipe
    from mmgen.recipes.common import caption_datasets

    make_shards(tmp_path, 1, 2, seed=6)
    recipe = from_dict(CLIPRecipe, {"data": {"train": str(tmp_path), "val": str(tmp_path), "captions_per_image": "first"}})
    train_set, val_set = caption_datasets(recipe.data, image_size=8, normalize="clip", seed=0)
    assert (train_set.captions_per_image, train_set.endless) == ("first", True)
    assert (val_set.captions_per_image, val_set.endless) == ("first", False)
    with pytest.raises(ConfigError, match="data.captions_per_image"):
        from_dict(CLIPRecipe, {"data": {"captions_per_image": "every"}})


def test_a_command_failing_after_its_data_is_a_bad_shard_unless_the_reader_stopped_early(tmp_path, capsys):
    paths, captions = make_shards(tmp_path, 1, 3, seed=8)
    dataset = build_caption_dataset(f"pipe:cat {paths[0]}; exit 3", image_size=4, train=False)
    items = iter(dataset)
    assert next(items)["caption"] == captions[0]
    items.close()  # a stream left mid-shard: its command's exit status is not a damaged shard
    assert capsys.readouterr().err == ""
    items = list(dataset)
    assert captions_of(items[:3]) == captions and "exit 3" in items[3].reason and len(items) == 4
    assert "exit 3" in capsys.readouterr().err


def test_a_clip_run_on_shards_resumed_mid_epoch_ends_with_the_uninterrupted_weights(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from mmgen import cli
    from tests.clip.test_recipe import write_config

    (tmp_path / "shards").mkdir()
    make_shards(tmp_path / "shards", 3, 8, seed=9)  # 24 samples; 8 steps of 4 read 32: the resume is mid-epoch 1
    config = write_config(tmp_path, data={"train": str(tmp_path / "shards"), "val": None, "cache": False,
                                          "zeroshot": None, "retrieval": None},
                          train={"batch_size": 4, "max_steps": 8, "checkpoint_every": 5, "eval_every": 100})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert cli.main(["train", "clip", "--config", str(config), "--out", str(whole)]) == 0
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "final")
    for checkpoint in (resumed / "checkpoints").iterdir():
        if checkpoint.name != "step-5":
            shutil.rmtree(checkpoint)
    assert cli.main(["train", "clip", "--resume", str(resumed)]) == 0
    before, after = load_file(whole / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
