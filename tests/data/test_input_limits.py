"""Inputs that used to pass quietly: shards cut short (at a member boundary too) and images with huge dimensions."""

import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mmgen.data.captions import WebDatasetShards, build_caption_dataset
from mmgen.data.images import load_rgb
from mmgen.data.robust import BadSample, load_sample
from mmgen.errors import ConfigError

from .helpers import image_bytes, random_caption, random_image, write_shard


def make_shard(path, count: int = 3):
    """A shard of `count` samples (key.png + key.txt); returns its captions and each member's header offset."""
    rng = np.random.default_rng(0)
    samples = [(f"k{i}", image_bytes(random_image(rng, "RGB"), "PNG"), "png", random_caption(rng)) for i in range(count)]
    write_shard(path, samples)
    with tarfile.open(path) as archive:
        members = archive.getmembers()
    return [caption for *_, caption in samples], members


def read(path):
    items = list(WebDatasetShards([path], lambda image: torch.zeros(3, 2, 2)))
    return [item["caption"] for item in items if isinstance(item, dict)], [item for item in items if not isinstance(item, dict)]


def test_a_complete_shard_gives_no_warning(tmp_path, capsys):
    captions, _ = make_shard(tmp_path / "whole.tar")
    assert read(tmp_path / "whole.tar") == (captions, [])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("cut", ["between samples", "before the end blocks"])
def test_a_shard_cut_at_a_member_boundary_is_counted_and_warned_about_once(tmp_path, capsys, cut):
    path = tmp_path / "cut.tar"
    captions, members = make_shard(path)
    data = path.read_bytes()
    if cut == "between samples":  # the header of the last sample's image: two whole samples are left
        end, kept = members[4].offset, captions[:2]
    else:  # every member, without the two zero blocks that end an archive
        end, kept = members[-1].offset_data + 512 * -(-members[-1].size // 512), captions
    path.write_bytes(data[:end])
    good, bad = read(path)
    assert good == kept and [item.reason for item in bad] == ["unreadable shard: truncated (it ends without the "
                                                              "end-of-archive blocks)"]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and str(path) in err
    assert read(path)[1] == bad  # counted again at every pass ...
    assert capsys.readouterr().err == ""  # ... but named once


def test_a_shard_cut_inside_a_member_is_counted_and_warned_about(tmp_path, capsys):
    path = tmp_path / "mid.tar"
    captions, members = make_shard(path)
    path.write_bytes(path.read_bytes()[: members[2].offset_data + members[2].size // 2])  # inside k1.png
    good, bad = read(path)
    assert good == captions[:1] and len(bad) == 1 and bad[0].reason.startswith("unreadable shard: ")
    assert str(path) in capsys.readouterr().err


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """A 10000 x 10000 PNG of 12 KB (decoded: 300 MB as RGB)."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("1", (10_000, 10_000)).save(path)
    return path


def test_an_image_with_too_many_pixels_is_a_bad_sample_never_decoded(huge_png, tmp_path):
    item = load_sample(huge_png, "a caption", lambda image: image, source=str(huge_png))
    assert item == BadSample(str(huge_png), "too many pixels")
    header_only = tmp_path / "header-only.png"  # decoding it would fail as "truncated": it is never tried
    header_only.write_bytes(huge_png.read_bytes()[:200])
    assert load_sample(header_only, "a caption", lambda image: image, source="h").reason == "too many pixels"
    (tmp_path / "table.csv").write_text(f"image,caption\n{huge_png},a black square\n")
    assert build_caption_dataset(str(tmp_path / "table.csv"), image_size=8)[0].reason == "too many pixels"


def test_the_pixel_limit_is_set_by_an_environment_variable(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    random_image(np.random.default_rng(0), "RGB", size=(8, 8)).save(path)
    monkeypatch.setenv("MMGEN_MAX_IMAGE_PIXELS", "64")
    assert load_rgb(path).size == (8, 8)
    monkeypatch.setenv("MMGEN_MAX_IMAGE_PIXELS", "63")
    with pytest.raises(Image.DecompressionBombError, match="8x8 pixels, more than 63"):
        load_rgb(path)
    monkeypatch.setenv("MMGEN_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ConfigError, match="MMGEN_MAX_IMAGE_PIXELS"):  # a setting to fix, not a bad sample
        load_sample(path, "a caption", lambda image: image, source=str(path))
