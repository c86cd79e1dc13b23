"""The synthetic shapes data: determinism, captions and labels, held-out compositions, faithful rendering."""

import numpy as np
import pytest
import torch

from mmgen.data.shapes import (
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    caption,
    class_index,
    class_names,
    heldout_pairs,
    render,
)
from mmgen.errors import ConfigError


def test_same_seed_same_pixels_and_different_items_differ():
    rng = np.random.default_rng(0)
    seed = int(rng.integers(1000))
    a, b = ShapesDataset("train", 500, 32, seed), ShapesDataset("train", 500, 32, seed)
    other_seed = ShapesDataset("train", 500, 32, seed + 1)
    val = ShapesDataset("val", 500, 32, seed)
    for index in rng.choice(500, size=5, replace=False).tolist():
        assert torch.equal(a[index]["image"], b[index]["image"]) and a[index]["caption"] == b[index]["caption"]
        assert not torch.equal(a[index]["image"], a[(index + 1) % 500]["image"])
        assert not torch.equal(a[index]["image"], other_seed[index]["image"])
        assert not torch.equal(a[index]["image"], val[index]["image"])


def test_items_are_tensors_with_captions_and_labels_that_match_their_attributes():
    dataset = ShapesDataset("train", 300, 48, seed=3, partial_captions=0.0)
    for index in np.random.default_rng(1).choice(300, size=6, replace=False).tolist():
        item, attributes = dataset[index], dataset.attributes(index)
        assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
        assert item["caption"] == caption(attributes)
        assert item["caption"].split()[1:4] == [attributes["size"], attributes["colour"], attributes["shape"]]
        assert item["caption"].endswith(attributes["position"])
        assert class_names()[item["label"]] == f"{attributes['colour']} {attributes['shape']}"
        assert torch.equal(item["image"], dataset.transform(dataset.image(index)))


def test_class_names_and_captions():
    names = class_names()
    assert len(names) == len(set(names)) == len(SHAPES) * len(COLOURS) >= 30
    assert names[class_index("star", "blue")] == "blue star"
    attributes = {"shape": "circle", "colour": "red", "size": "small", "position": "top left"}
    assert caption(attributes) == "a small red circle at the top left"
    assert caption({**attributes, "position": "center", "size": "large"}) == "a large red circle in the center"
    assert caption({**attributes, "position": "right"}) == "a small red circle on the right"


def test_heldout_pairs_are_balanced_seeded_and_leave_every_shape_and_colour_in_train():
    held = heldout_pairs()
    assert held == heldout_pairs(seed=0) and held != heldout_pairs(seed=1)
    total = len(SHAPES) * len(COLOURS)
    assert abs(len(held) - 0.2 * total) <= 1
    for seed in range(20):
        pairs = heldout_pairs(seed=seed)
        assert max(sum(s == shape for s, _ in pairs) for shape in SHAPES) <= 2
        assert max(sum(c == colour for _, c in pairs) for colour in COLOURS) <= 2


def test_train_never_shows_heldout_pairs_and_val_shows_only_them():
    train, val = ShapesDataset("train", 2000, seed=5), ShapesDataset("val", 400, seed=5)
    held = train.heldout
    train_attributes = [train.attributes(i) for i in range(len(train))]
    val_attributes = [val.attributes(i) for i in range(len(val))]
    train_pairs = {(a["shape"], a["colour"]) for a in train_attributes}
    assert not train_pairs & held
    assert train_pairs == {(s, c) for s in SHAPES for c in COLOURS} - held  # every allowed pair occurs
    assert {a["shape"] for a in train_attributes} == set(SHAPES)
    assert {a["colour"] for a in train_attributes} == set(COLOURS)
    assert {a["size"] for a in train_attributes} == set(SIZES) and {a["position"] for a in train_attributes} == set(POSITIONS)
    assert {(a["shape"], a["colour"]) for a in val_attributes} == held
    assert {a["position"] for a in val_attributes} == set(POSITIONS)
    assert {val[i]["label"] for i in range(40)} <= {class_index(*pair) for pair in held}


def _shape_mask(image: np.ndarray) -> np.ndarray:
    background = np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]), axis=0)
    return np.abs(image.astype(float) - background).sum(-1) > 60


@pytest.mark.parametrize("colour", COLOURS)
def test_rendering_puts_the_right_colour_in_the_right_cell(colour):
    rng = np.random.default_rng(COLOURS.index(colour))
    size = 60
    for _ in range(4):
        attributes = {"shape": SHAPES[rng.integers(len(SHAPES))], "colour": colour, "size": "large",
                      "position": POSITIONS[rng.integers(len(POSITIONS))]}
        image = np.asarray(render(attributes, size, rng))
        mask = _shape_mask(image)
        rows, columns = np.nonzero(mask)
        row, column = divmod(POSITIONS.index(attributes["position"]), 3)
        assert rows.min() >= row * size // 3 - 1 and rows.max() <= (row + 1) * size // 3 + 1
        assert columns.min() >= column * size // 3 - 1 and columns.max() <= (column + 1) * size // 3 + 1
        core = image[mask].astype(float).mean(0)
        distances = {name: np.abs(core - rgb).sum() for name, rgb in COLOUR_RGB.items()}
        assert min(distances, key=distances.get) == colour


def test_large_shapes_cover_more_pixels_than_small_ones():
    rng = np.random.default_rng(7)
    for shape in SHAPES:
        areas = {}
        for size in SIZES:
            attributes = {"shape": shape, "colour": "yellow", "size": size, "position": "center"}
            areas[size] = _shape_mask(np.asarray(render(attributes, 48, rng))).sum()
        assert areas["large"] > 2 * areas["small"] > 0


def test_shapes_are_told_apart_by_their_outlines():
    masks = {}
    for shape in SHAPES:
        attributes = {"shape": shape, "colour": "white", "size": "large", "position": "center"}
        masks[shape] = _shape_mask(np.asarray(render(attributes, 96, np.random.default_rng(0))))
    for first in SHAPES:
        for second in SHAPES:
            if first < second:
                overlap = (masks[first] & masks[second]).sum() / (masks[first] | masks[second]).sum()
                assert overlap < 0.85, (first, second)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="split"):
        ShapesDataset("test")
    with pytest.raises(ConfigError, match="heldout_fraction"):
        ShapesDataset(heldout_fraction=0.9)
    with pytest.raises(IndexError):
        ShapesDataset(size=3)[3]


def test_partial_captions_name_a_subset_of_the_attributes():
    from mmgen.data.shapes import PARTIAL_CAPTIONS

    train = ShapesDataset("train", 400, 16, seed=0)
    captions = [train.caption(index) for index in range(400)]
    full = [caption(train.attributes(index)) for index in range(400)]
    partial = [index for index in range(400) if captions[index] != full[index]]
    assert 0.7 < len(partial) / 400 < 0.9  # 80% of the training captions by default
    forms = {caption(train.attributes(index), omit) for index in partial for omit in PARTIAL_CAPTIONS}
    assert all(captions[index] in forms for index in partial)
    assert any(captions[index].endswith("shape") or " shape " in captions[index] for index in partial)
    assert any(len(captions[index].split()) == 3 for index in partial)  # "a red circle"
    val = ShapesDataset("val", 50, 16, seed=0)
    assert all(val.caption(index) == caption(val.attributes(index)) for index in range(50))  # complete in val


def test_hard_negative_groups_differ_only_in_shape():
    from mmgen.data.groups import GroupedItems
    from mmgen.data.robust import collate_captions

    dataset = ShapesDataset("train", 64, 16, seed=4, group_size=4)
    for group in range(16):
        members = [dataset.attributes(group * 4 + member) for member in range(4)]
        assert len({(m["colour"], m["size"], m["position"]) for m in members}) == 1
        assert len({m["shape"] for m in members}) == 4
        assert all((m["shape"], m["colour"]) not in dataset.heldout for m in members)
    batch = collate_captions([GroupedItems(dataset, 4)[i] for i in (0, 5)])
    assert batch["images"].shape == (8, 3, 16, 16) and len(batch["captions"]) == 8
    assert batch["labels"].tolist() == [dataset[i]["label"] for i in (0, 1, 2, 3, 20, 21, 22, 23)]
    with pytest.raises(ConfigError, match="group_size must lie in"):
        ShapesDataset("train", 8, 16, group_size=6)


def test_captions_without_colour_come_with_grey_images():
    dataset = ShapesDataset("train", 200, 16, seed=5)
    checked = {"grey": 0, "colour": 0}
    for index in range(200):
        item, attributes = dataset[index], dataset.attributes(index)
        channels_equal = torch.allclose(item["image"][0] * 0.26862954 + 0.48145466,
                                        item["image"][1] * 0.26130258 + 0.4578275, atol=1e-5)
        if attributes["colour"] in item["caption"].split():
            checked["colour"] += 1
            assert not channels_equal or attributes["colour"] == "white"
        else:
            checked["grey"] += 1
            assert channels_equal
    assert checked["grey"] > 10 and checked["colour"] > 100
