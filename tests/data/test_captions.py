"""Caption tables, labelled folders, the shapes spec and the errors of build_caption_dataset."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmgen.data.captions import DEFAULT_TEMPLATES, CaptionTable, build_caption_dataset, class_name, expand_braces
from mmgen.data.robust import collate_captions
from mmgen.data.shapes import ShapesDataset
from mmgen.errors import UserError

from .helpers import MODES, random_caption, random_image, write_table


def make_table(folder, suffix, rng, columns=("image", "caption"), count=6):
    """A table of `count` images of every test mode (odd sizes) in folder/images, one given by absolute path."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        mode = MODES[index % len(MODES)]
        path = folder / "images" / f"{index}-{mode}.{'jpg' if mode in ('L', 'RGB') else 'png'}"
        random_image(rng, mode).save(path)
        relative = str(path) if index == 0 else f"images/{path.name}"
        rows.append({columns[0]: relative, columns[1]: random_caption(rng), "extra": index})
    table = folder / f"table{suffix}"
    write_table(table, rows)
    return table, rows


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
@pytest.mark.parametrize("train", [True, False])
def test_tables_give_rgb_tensors_of_the_requested_size(tmp_path, suffix, train):
    rng = np.random.default_rng(len(suffix) + train)
    table, rows = make_table(tmp_path / "data", suffix, rng)
    dataset = build_caption_dataset(str(table), image_size=20, train=train)
    assert isinstance(dataset, CaptionTable) and len(dataset) == len(rows)
    for item, row in zip(dataset, rows):
        assert item["caption"] == row["caption"].strip()
        assert item["image"].shape == (3, 20, 20) and item["image"].dtype == torch.float32
        assert "label" not in item


def test_custom_columns_and_a_dataloader_batch(tmp_path):
    rng = np.random.default_rng(11)
    table, rows = make_table(tmp_path, ".csv", rng, columns=("file", "text"), count=5)
    dataset = build_caption_dataset(str(table), image_size=16, columns=("file", "text"), normalize="minus_one_to_one")
    batch = next(iter(DataLoader(dataset, batch_size=5, collate_fn=collate_captions)))
    assert batch["images"].shape == (5, 3, 16, 16) and batch["images"].abs().max() <= 1
    assert batch["captions"] == [row["text"] for row in rows]
    assert batch["skipped"] == 0 and batch["skipped_examples"] == [] and "labels" not in batch


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_a_missing_column_names_the_column_and_the_file(tmp_path, suffix):
    table, _ = make_table(tmp_path, suffix, np.random.default_rng(2), count=2)
    with pytest.raises(UserError, match=rf"table{suffix}.*'text'.*data.columns"):
        build_caption_dataset(str(table), columns=("image", "text"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_an_empty_table_is_a_user_error(tmp_path, suffix):
    table = tmp_path / f"empty{suffix}"
    write_table(table, [])
    with pytest.raises(UserError, match="no rows"):
        build_caption_dataset(str(table))


def test_bad_paths_and_formats_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_caption_dataset(str(tmp_path / "nowhere.csv"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="unknown data format '.txt'"):
        build_caption_dataset(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"image": \n')
    with pytest.raises(UserError, match="broken.jsonl line 2"):
        build_caption_dataset(str(tmp_path / "broken.jsonl"))
    (tmp_path / "latin1.csv").write_bytes("image,caption\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        build_caption_dataset(str(tmp_path / "latin1.csv"))


def make_labelled_folder(root, rng, classes=("golden_retriever", "tabby-cat", "red fox"), per_class=3):
    for label, folder in enumerate(classes):
        (root / folder).mkdir(parents=True)
        for index in range(per_class + label):
            random_image(rng, MODES[index % len(MODES)]).save(root / folder / f"{index}.png")
    (root / ".cache").mkdir()  # hidden folders are not classes
    return classes


def test_labelled_folder_gives_template_captions_and_labels(tmp_path):
    rng = np.random.default_rng(9)
    make_labelled_folder(tmp_path / "pets", rng)
    dataset = build_caption_dataset(str(tmp_path / "pets"), image_size=12, train=True, seed=4)
    assert dataset.classes == ["golden retriever", "red fox", "tabby cat"]
    assert len(dataset) == 3 + 4 + 5
    captions = []
    for index in range(len(dataset)):
        item = dataset[index]
        name = dataset.classes[item["label"]]
        assert item["caption"] in [template.format(name) for template in DEFAULT_TEMPLATES]
        assert item["image"].shape == (3, 12, 12)
        captions.append(item["caption"])
    assert len({caption.replace(dataset.classes[label], "{}") for caption, label in zip(captions, dataset.labels)}) > 1
    assert sorted(dataset.labels) == [0] * 3 + [1] * 5 + [2] * 4  # sorted folders: golden, red, tabby
    with pytest.raises(UserError, match="'no' has no"):
        build_caption_dataset(str(tmp_path / "pets"), templates=["no"])
    evaluation = build_caption_dataset(str(tmp_path / "pets"), train=False, templates=["{} in a picture", "a {}"])
    assert [evaluation[i]["caption"] for i in (0, len(evaluation) - 1)] == ["golden retriever in a picture",
                                                                           "tabby cat in a picture"]
    batch = collate_captions([evaluation[i] for i in range(4)])
    assert batch["labels"].tolist() == evaluation.labels[:4]


def test_labelled_folder_errors(tmp_path):
    (tmp_path / "flat").mkdir()
    random_image(np.random.default_rng(0), "RGB").save(tmp_path / "flat" / "a.png")
    with pytest.raises(UserError, match="no class sub-folders"):
        build_caption_dataset(str(tmp_path / "flat"))
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="hold no images"):
        build_caption_dataset(str(tmp_path / "hollow"))


def test_class_names_from_folder_names():
    assert class_name("golden_retriever") == "golden retriever"
    assert class_name("tabby--cat_") == "tabby cat"


def test_shapes_specs():
    dataset = build_caption_dataset("shapes:val:37", image_size=24, seed=2)
    assert isinstance(dataset, ShapesDataset) and dataset.split == "val" and len(dataset) == 37
    assert dataset[0]["image"].shape == (3, 24, 24)
    default = build_caption_dataset("shapes", split="val")
    assert default.split == "val" and len(default) == 1000
    assert len(build_caption_dataset("shapes:500")) == 500
    with pytest.raises(UserError, match="'test' is neither"):
        build_caption_dataset("shapes:test")


def test_brace_patterns():
    assert expand_braces("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    with pytest.raises(UserError, match="bad range"):
        expand_braces("s-{5..2}.tar")
