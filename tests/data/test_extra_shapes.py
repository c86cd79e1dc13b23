"""Opt-in extra shapes: new classes after the built-in ones, their own held-out colours, the defaults untouched."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgen.data.captions import build_caption_dataset
from mmgen.data.shapes import (
    COLOURS,
    EXTRA_SHAPES,
    SHAPES,
    ShapesDataset,
    class_index,
    class_names,
    heldout_pairs,
    render,
)
from mmgen.errors import ConfigError, UserError
from tests.data.test_shapes import _shape_mask

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_extra_shapes_come_after_the_built_in_classes_with_their_own_held_out_colours():
    plain, extended = ShapesDataset("train", 300, 16, seed=2), ShapesDataset("train", 300, 16, seed=2,
                                                                             extra_shapes=("heart", "hexagon"))
    assert extended.class_names()[: len(class_names())] == class_names() == plain.class_names()
    assert extended.class_names()[-len(COLOURS):] == [f"{colour} hexagon" for colour in COLOURS]
    new = extended.heldout - heldout_pairs()
    assert heldout_pairs() <= extended.heldout and {shape for shape, _ in new} == {"heart", "hexagon"}
    assert all(sum(s == shape for s, _ in new) == 1 for shape in ("heart", "hexagon"))  # ~20% of 7 colours
    attributes = [extended.attributes(i) for i in range(300)]
    assert {"heart", "hexagon"} <= {a["shape"] for a in attributes}
    assert not {(a["shape"], a["colour"]) for a in attributes} & extended.heldout
    for index in range(0, 300, 37):
        a = attributes[index]
        assert extended[index]["label"] == class_index(a["shape"], a["colour"], extended.shapes)
        if a["shape"] in SHAPES:
            assert extended[index]["label"] == class_index(a["shape"], a["colour"])  # old labels keep their numbers
    val = ShapesDataset("val", 200, 16, extra_shapes=("heart",))
    assert {(val.attributes(i)["shape"], val.attributes(i)["colour"]) for i in range(200)} == val.heldout


def test_the_default_datasets_do_not_change():
    for split in ("train", "val"):
        default, explicit = ShapesDataset(split, 20, 16, seed=1), ShapesDataset(split, 20, 16, seed=1, extra_shapes=())
        assert default.shapes == SHAPES and default.heldout == heldout_pairs()
        for index in range(20):
            assert torch.equal(default[index]["image"], explicit[index]["image"])
            assert default[index]["caption"] == explicit[index]["caption"]


def test_extra_fraction_sets_the_share_of_extra_shape_items():
    default = ShapesDataset("train", 700, 16, extra_shapes=("heart",))
    mixed = build_caption_dataset("shapes:train:700:extra=heart:extra_fraction=0.5", image_size=16)
    share = [sum(d.attributes(i)["shape"] == "heart" for i in range(700)) / 700 for d in (default, mixed)]
    assert 0.08 < share[0] < 0.22 and 0.42 < share[1] < 0.58, share
    assert {(mixed.attributes(i)["shape"], mixed.attributes(i)["colour"]) for i in range(700)} <= set(mixed.pairs)
    for spec, message in [("shapes:extra=heart:extra_fraction=1", "must lie in \\(0, 1\\)"),
                          ("shapes:extra_fraction=0.5", "needs extra shapes")]:
        with pytest.raises(ConfigError, match=message):
            build_caption_dataset(spec, image_size=16)
    with pytest.raises(UserError, match="'extra_fraction=half' is not extra_fraction=NUMBER"):
        build_caption_dataset("shapes:extra=heart:extra_fraction=half")


def test_data_specs_select_extra_shapes():
    dataset = build_caption_dataset("shapes:val:30:extra=heart,pentagon", image_size=16)
    assert dataset.split == "val" and len(dataset) == 30 and dataset.shapes == SHAPES + ("heart", "pentagon")
    with pytest.raises(ConfigError, match="unknown extra shape 'blob' \\(extra shapes: heart, hexagon, pentagon\\)"):
        build_caption_dataset("shapes:extra=blob")
    with pytest.raises(ConfigError, match="repeat"):
        build_caption_dataset("shapes:extra=heart,heart")
    with pytest.raises(UserError, match="extra=SHAPE"):
        build_caption_dataset("shapes:extra=")


def test_extra_shapes_render_inside_their_cell_and_differ_from_every_other_outline():
    masks = {}
    for shape in SHAPES + EXTRA_SHAPES:
        attributes = {"shape": shape, "colour": "white", "size": "large", "position": "center"}
        masks[shape] = _shape_mask(np.asarray(render(attributes, 96, np.random.default_rng(0))))
    for extra in EXTRA_SHAPES:
        rows, columns = np.nonzero(masks[extra])
        assert 31 <= rows.min() and rows.max() <= 65 and 31 <= columns.min() and columns.max() <= 65
        for other in SHAPES + EXTRA_SHAPES:
            if other != extra:
                overlap = (masks[extra] & masks[other]).sum() / (masks[extra] | masks[other]).sum()
                assert overlap < 0.9, (extra, other)


def test_the_judge_reads_an_extra_shape(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    judge_module = importlib.import_module("judge")
    try:
        config = judge_module.JudgeConfig(image_size=16, shapes=SHAPES + ("heart",), widths=(4,), steps=1,
                                          batch_size=8)
        judge = judge_module.train_judge(config, progress=False)
        assert judge.heads["shape"][-1] == "heart"
        attributes = [{"shape": "heart", "colour": "red", "size": "large", "position": "center"}]
        images = judge_module.render_batch(attributes, 16, np.random.default_rng(0))
        assert judge.predict(images)["shape"][0] in config.shapes
        assert judge_module.default_cache_dir(config).name == "judge-16px-heart"
    finally:
        sys.modules.pop("judge", None)
