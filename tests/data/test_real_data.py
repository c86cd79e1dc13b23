"""bench/real_data.py writes scikit-learn's digits as captioned data that mmgen's caption readers load, and
bench/digits_judge.py scores samples against the classes their prompts named."""

import csv
import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmgen.data.captions import build_caption_dataset
from mmgen.errors import UserError

pytest.importorskip("sklearn")
BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("real_data")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A 100-image digits folder at 16x16."""
    sys.path.insert(0, str(BENCH))
    try:
        real_data = importlib.import_module("real_data")
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path_factory.mktemp("real") / "digits"
    real_data.write_digits(out, size=16, limit=100)
    return out


def read_rows(table: Path) -> list[dict]:
    with open(table, newline="") as file:
        return list(csv.DictReader(file))


def test_split_is_stratified_disjoint_and_fixed(bench):
    labels = np.repeat(np.arange(10), 30)
    train, val = bench.stratified_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val]).tolist() == [6] * 10  # 20% of every class
    again_train, again_val = bench.stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert not np.array_equal(val, bench.stratified_split(labels, 0.2, seed=4)[1])
    assert bench.stratified_split(np.array([0, 0, 1]), 0.2)[1].tolist() in ([0], [1])  # a lone item stays in train
    with pytest.raises(UserError, match="fraction"):
        bench.stratified_split(labels, 1.0)


def test_written_folder_is_read_by_the_caption_readers(digits):
    train_rows, val_rows = read_rows(digits / "train.csv"), read_rows(digits / "val.csv")
    assert len(train_rows) + len(val_rows) == 100 and 15 <= len(val_rows) <= 25
    assert not {row["image"] for row in train_rows} & {row["image"] for row in val_rows}
    words = (digits / "classes.txt").read_text().split()
    assert words[7] == "seven" and len(words) == 10
    for row in train_rows + val_rows:  # every caption names its class, as a word or a numeral
        label = int(row["label"])
        assert row["class"] == words[label] and (words[label] in row["caption"] or str(label) in row["caption"])
        assert row["image"].startswith(f"{'train' if row in train_rows else 'val'}/{words[label]}/")
    assert len({row["caption"].replace(row["class"], "{}") for row in train_rows}) > 2  # several phrasings

    table = build_caption_dataset(str(digits / "train.csv"), image_size=16, train=False)
    item = table[0]
    assert item["image"].shape == (3, 16, 16) and item["caption"] == train_rows[0]["caption"]
    assert item["image"].std() > 0.1  # a digit, not a blank
    folder = build_caption_dataset(str(digits / "val"), image_size=16, train=False,
                                   templates=(digits / "zeroshot_templates.txt").read_text().splitlines())
    assert sorted(folder.classes) == sorted(words) and len(folder) == len(val_rows)
    assert folder.caption(0) == f"a handwritten digit {folder.classes[folder.labels[0]]}"


def test_writer_refuses_an_existing_folder_and_a_tiny_size(bench, digits, tmp_path):
    result = subprocess.run([sys.executable, str(BENCH / "real_data.py"), "digits", "--out", str(digits)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "already exists" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(UserError, match="--size must be >= 8"):
        bench.write_digits(tmp_path / "small", size=4)
    assert not (tmp_path / "small").exists()


def test_real_data_help():
    result = subprocess.run([sys.executable, str(BENCH / "real_data.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "digits" in result.stdout


def test_judge_learns_real_digits_and_scores_fidelity(digits, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    judge_module = importlib.import_module("digits_judge")
    config = judge_module.DigitsJudgeConfig(image_size=16, widths=(8, 16), epochs=25, batch_size=32)
    judge = judge_module.load_or_train_digits_judge(digits, tmp_path / "judge", config=config, progress=False)
    assert judge.report["train_images"] + judge.report["held_out_images"] == 100
    train_paths, train_labels = importlib.import_module("real_data").read_split(digits, "train")
    predicted = judge.predict(judge_module.load_images(train_paths, 16))
    assert np.mean(np.array(predicted) == np.array(train_labels)) > 0.5  # it learnt something (chance: 0.1)
    again = judge_module.load_or_train_digits_judge(digits, tmp_path / "judge", config=config, progress=False)
    for name, tensor in judge.net.state_dict().items():  # the cache gives back the same weights
        assert torch.equal(again.net.state_dict()[name], tensor)

    fidelity = judge_module.prompt_fidelity([7, 7, 1, 3], [7, 1, 1, 3])
    assert fidelity["overall"] == 0.75 and fidelity["per_class"] == {"one": 0.5, "three": 1.0, "seven": 1.0}
    assert fidelity["confused_with"] == {"one": "seven"}
    blank = [Image.new("L", (16, 16), 255)] * 4
    grid = judge_module.class_grid(blank, [7, 1, 1, 3], tmp_path / "grid.png", per_row=2, predicted=[7, 7, 1, 3])
    with Image.open(grid) as picture:
        assert picture.height == 3 * (32 + 2)  # three classes, one row each
        rgb = picture.convert("RGB")
        assert rgb.getpixel((48, 0)) == (255, 0, 0)  # the first "one" was judged a seven: framed red
        assert rgb.getpixel((48 + 34, 0)) == (255, 255, 255)  # the second was judged right: no frame
