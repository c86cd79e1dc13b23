"""Holding out part of a user's caption table: mmgen/data/split.py and `mmgen split-data`."""

import csv
import json

import pytest

from mmgen import cli
from mmgen.data.captions import build_caption_dataset
from mmgen.data.split import split_indices, split_table
from mmgen.errors import UserError
from tests.test_cli import run_cli


def test_split_indices_are_seeded_disjoint_and_stratified():
    groups = ["cat"] * 10 + ["dog"] * 20 + ["lone"]
    train, val = split_indices(len(groups), 0.1, seed=1, groups=groups)
    assert sorted(train + val) == list(range(31)) and not set(train) & set(val)
    assert sorted(groups[i] for i in val) == ["cat", "dog", "dog"]  # 10% of each class; a lone item stays in train
    assert split_indices(len(groups), 0.1, seed=1, groups=groups) == (train, val)
    assert split_indices(len(groups), 0.1, seed=2, groups=groups)[1] != val
    assert len(split_indices(5, 0.01)[1]) == 1 and len(split_indices(5, 0.99)[1]) == 4  # at least one, never all
    with pytest.raises(UserError, match="fraction"):
        split_indices(5, 0.0)


def test_csv_split_keeps_rows_and_paths_readable(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    rows = []
    for index in range(20):
        Image.new("RGB", (8, 8), (index * 10, 0, 0)).save(tmp_path / "img" / f"{index}.png")
        rows.append({"image": f"img/{index}.png", "caption": f'a "red", number {index}', "label": "ab"[index % 2]})
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    split = split_table(table, val_fraction=0.2, seed=0, stratify="label")
    assert (split.train, split.val) == (tmp_path / "pairs.train.csv", tmp_path / "pairs.val.csv")
    assert (split.train_rows, split.val_rows) == (16, 4)
    train_rows, val_rows = (list(csv.DictReader(open(path, newline=""))) for path in (split.train, split.val))
    assert sorted(train_rows + val_rows, key=lambda row: int(row["image"][4:-4])) == rows  # verbatim, nothing lost
    assert sorted(row["label"] for row in val_rows) == ["a", "a", "b", "b"]
    dataset = build_caption_dataset(str(split.val), image_size=8, train=False)  # relative paths still resolve
    assert dataset[0]["caption"] == val_rows[0]["caption"] and dataset[0]["image"].shape == (3, 8, 8)
    with pytest.raises(UserError, match="already exists"):
        split_table(table)
    with pytest.raises(UserError, match="no column 'class' to stratify by"):
        split_table(_copy(table), stratify="class")


def _copy(table):
    other = table.with_name("other.csv")
    other.write_bytes(table.read_bytes())
    return other


def test_tsv_and_jsonl_splits(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("image\tcaption\n" + "".join(f'{i}.png\ta "quoted" caption {i}\n' for i in range(10)))
    split = split_table(tsv, val_fraction=0.3)
    assert split.val_rows == 3 and split.val.read_text().count('"quoted"') == 3
    assert split.train.read_text().splitlines()[0] == "image\tcaption"
    jsonl = tmp_path / "p.jsonl"
    lines = [json.dumps({"image": f"{i}.png", "caption": f"c {i}", "kind": i % 2}) for i in range(10)]
    jsonl.write_text("\n".join(lines) + "\n\n")
    split = split_table(jsonl, val_fraction=0.2, stratify="kind")
    held_out = [json.loads(line) for line in split.val.read_text().splitlines()]
    assert sorted(row["kind"] for row in held_out) == [0, 1]
    assert sorted(split.train.read_text().splitlines() + split.val.read_text().splitlines()) == sorted(lines)


def test_split_data_command(tmp_path, capsys):
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\n" + "".join(f"{i}.png,c {i}\n" for i in range(10)))
    code, out, _ = run_cli(["split-data", table, "--val-fraction", "0.2", "--seed", "3"], capsys)
    assert code == 0 and "(8 rows)" in out and "(2 rows)" in out and f"data.val={tmp_path / 'pairs.val.csv'}" in out
    code, _, err = run_cli(["split-data", table], capsys)
    assert code == 1 and err.count("\n") == 1 and "already exists" in err
    code, _, err = run_cli(["split-data", tmp_path / "missing.csv"], capsys)
    assert code == 1 and "table not found" in err
    code, _, err = run_cli(["split-data", table, "--val-fraction", "1.5"], capsys)
    assert code == 2 and "must lie in (0, 1)" in err
    assert cli.main(["split-data", "--help"]) == 0 and "--stratify" in capsys.readouterr().out
