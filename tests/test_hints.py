"""What a finished run suggests names the run's own data (mmgen/hints.py), and the own-data recipes load."""

import importlib
import shlex
from pathlib import Path

import pytest
import yaml

from mmgen.commands import find_recipe
from mmgen.config import from_dict, load_yaml
from mmgen.hints import PROMPT_PLACEHOLDER, SHAPES_PROMPT, eval_options, example_prompt, finished_hint
from tests.clip.test_recipe import TINY_CLIP
from tests.test_cli import run_cli

REPOSITORY = Path(__file__).resolve().parents[1]


def write_run_config(run_dir: Path, config: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def test_clip_hint_names_the_runs_own_held_out_data(tmp_path):
    hint = find_recipe("train", "clip").hint
    mine = write_run_config(tmp_path / "mine", {"data": {
        "train": "my data/train.csv", "val": "my data/val.csv", "zeroshot": "my data/val", "retrieval": None}})
    assert finished_hint(hint, "runs/x", mine) == (
        "mmgen eval clip --checkpoint runs/x --zeroshot-dir 'my data/val' --retrieval 'my data/val.csv'")
    # the shapes recipe retargeted with data.train / data.val only: its shapes evaluation specs are not suggested
    retargeted = write_run_config(tmp_path / "retargeted", {"data": {
        "train": "d/train.csv", "val": "d/val.csv", "zeroshot": "shapes:val:4000", "retrieval": "shapes:val"}})
    text = finished_hint(hint, "runs/x", retargeted)
    assert text == "mmgen eval clip --checkpoint runs/x --retrieval d/val.csv" and "shapes" not in text
    on_shapes = write_run_config(tmp_path / "shapes", {"data": {
        "train": "shapes:train:40000", "val": "shapes:val:512", "zeroshot": "shapes:val:4000",
        "retrieval": "shapes:val"}})
    assert finished_hint(hint, "r", on_shapes) == "mmgen eval clip --checkpoint r --zeroshot-dir shapes:val:4000 " \
                                                  "--retrieval shapes:val"
    assert eval_options({"train": "d/train.csv", "val": None, "zeroshot": None, "retrieval": None}) == (
        " --zeroshot-dir LABELLED_DIR --retrieval HELD_OUT_TABLE")
    # no readable config.yaml: the placeholders, not shapes
    assert "shapes" not in finished_hint(hint, "r", tmp_path / "missing")


def test_text2img_hint_prompts_in_the_runs_own_words(tmp_path):
    hint = find_recipe("train", "diffusion").hint
    table = tmp_path / "val.csv"
    table.write_text('image,caption\na.png,"the number 7, written  by hand"\n')
    run = write_run_config(tmp_path / "run", {"data": {"train": "elsewhere.csv", "val": str(table)}})
    text = finished_hint(hint, "runs/t2i", run)
    assert shlex.split(text)[5:7] == ["--prompt", "the number 7, written by hand"]
    assert example_prompt({"data": {"train": "shapes:train"}}) == SHAPES_PROMPT
    assert example_prompt({"samples": {"prompts": ["a cat"]}, "data": {"train": "shapes"}}) == "a cat"
    assert example_prompt({"data": {"train": str(tmp_path / "absent.csv")}}) == PROMPT_PLACEHOLDER
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"image": "a.png", "text": ""}\n{"image": "b.png", "text": "a red bus"}\n')
    assert example_prompt({"data": {"train": str(jsonl), "columns": ["image", "text"]}}) == "a red bus"
    assert find_recipe("train", "vae").hint.format(run="r", eval_data="", prompt="p")  # hints without the fields


@pytest.mark.parametrize("name, module, schema", [("clip-own-data", "clip", "CLIPRecipe"),
                                                  ("diffusion-own-data", "diffusion", "DiffusionRecipe")])
def test_own_data_configs_load_and_name_no_shapes(name, module, schema):
    recipe_class = getattr(importlib.import_module(f"mmgen.recipes.{module}"), schema)
    recipe = from_dict(recipe_class, load_yaml(REPOSITORY / "configs" / f"{name}.yaml"))
    data = recipe.data
    assert not any(str(spec).startswith("shapes") for spec in (data.train, data.val, getattr(data, "zeroshot", None),
                                                               getattr(data, "retrieval", None)))
    assert data.val and data.val != data.train and data.crop_scale is not None and data.crop_scale[0] < 1


def test_clip_on_a_csv_ends_with_an_eval_hint_for_its_own_data(tmp_path, capsys):
    """`mmgen train clip` on a caption CSV: the hint's --retrieval is the run's data.val."""
    from PIL import Image

    for index in range(8):
        Image.new("L", (16, 16), 30 * index).save(tmp_path / f"{index}.png")
    for split in ("train", "val"):
        (tmp_path / f"{split}.csv").write_text("image,caption\n" + "".join(
            f"{index}.png,grey level {index}\n" for index in range(8)))
    config = tmp_path / "clip.yaml"
    config.write_text(yaml.safe_dump(TINY_CLIP))
    code, out, err = run_cli(["train", "clip", "--config", config, "--out", tmp_path / "run",
                              f"data.train={tmp_path / 'train.csv'}", f"data.val={tmp_path / 'val.csv'}",
                              "train.batch_size=4", "train.max_steps=1", "train.eval_every=0",
                              "train.checkpoint_every=0", "data.zeroshot=null", "data.retrieval=null"], capsys)
    assert code == 0, err
    printed = out + err
    assert f"mmgen eval clip --checkpoint {tmp_path / 'run'} --retrieval {tmp_path / 'val.csv'}" in printed
    assert "--zeroshot-dir shapes" not in printed
