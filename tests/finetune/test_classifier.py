"""CLIP with a classification head: zero-shot head, linear probe and fine-tuning on a labelled folder."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mmgen
from mmgen import cli
from mmgen.clip import CLIPClassifier, CLIPTokenizer
from mmgen.clip.zeroshot import classify, zero_shot_classifier
from mmgen.data.shapes import render
from mmgen.recipes.finetune_classifier import held_out_split
from tests.finetune.helpers import CASES, FAST_TRAIN, write_yaml
from tests.test_cli import one_line_error, run_cli

CLASSES = {"red_circle": ("circle", "red"), "blue_square": ("square", "blue"), "green_star": ("star", "green")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """base/ (a tiny CLIP), images/ (a labelled folder of shape renders, 6 per class) and a config."""
    folder = tmp_path_factory.mktemp("classifier")
    CASES["clip"].build().save_pretrained(folder / "base")
    rng = np.random.default_rng(0)
    for name, (shape, colour) in CLASSES.items():
        (folder / "images" / name).mkdir(parents=True)
        for index in range(6):
            attributes = {"shape": shape, "colour": colour, "size": "large", "position": "center"}
            render(attributes, 32, rng).save(folder / "images" / name / f"{index}.png")
    write_yaml(folder / "classifier.yaml", {"method": "full", "data": {"train": str(folder / "images")},
                                            "train": dict(FAST_TRAIN, checkpoint_every=0)})
    return folder


def train(folder, out, *overrides):
    return cli.main(["finetune", "clip-classifier", "--base", str(folder / "base"), "--config",
                     str(folder / "classifier.yaml"), "--out", str(folder / out), *overrides])


def test_zero_shot_head_starts_at_clip_zero_shot_probabilities():
    clip = CASES["clip"].build()
    names = ["red circle", "blue square", "green star"]
    model = CLIPClassifier.from_clip(clip, names).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = classify(clip, images, zero_shot_classifier(clip, CLIPTokenizer(16), names))
    with torch.no_grad():
        torch.testing.assert_close(model(images).softmax(dim=-1), expected, atol=1e-5, rtol=1e-5)
    assert CLIPClassifier.from_clip(clip, names, head_init="random").head.bias.abs().sum() > 0


def test_linear_probe_trains_only_the_head_and_reports_held_out_accuracy(folder):
    assert train(folder, "probe", "probe=true") == 0
    final = folder / "probe" / "final"
    model = mmgen.load(final)
    assert isinstance(model, CLIPClassifier) and model.config.classes == ["blue square", "green star", "red circle"]
    base = load_file(str(folder / "base/model.safetensors"))
    tuned = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(tuned[name], base[name]) for name in tuned if name.startswith("vision."))
    records = [json.loads(line) for line in (folder / "probe/metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val/accuracy" in r]
    assert [r["step"] for r in evaluations] == [2, 4] and all(0 <= r["val/accuracy"] <= 1 for r in evaluations)
    assert any("train/accuracy" in r for r in records)


def test_fine_tuning_with_a_head_moves_the_image_tower(folder):
    assert train(folder, "full", "train.max_steps=2", "head_init=random") == 0
    base = load_file(str(folder / "base/model.safetensors"))
    tuned = load_file(str(folder / "full/final/model.safetensors"))
    assert not torch.equal(tuned["vision.norm_post.weight"], base["vision.norm_post.weight"])


def test_held_out_split_is_per_class_and_seeded():
    labels = [0] * 10 + [1] * 5 + [2]
    train_indices, held_out = held_out_split(labels, 0.2, seed=3)
    assert sorted(train_indices + held_out) == list(range(16))
    assert sorted(labels[i] for i in held_out) == [0, 0, 1]  # a class with one image stays in training
    assert held_out_split(labels, 0.2, seed=3) == (train_indices, held_out)


def test_classifier_mistakes_are_one_line(folder, capsys):
    args = ["finetune", "clip-classifier", "--base", folder / "base", "--config", folder / "classifier.yaml",
            "--out", folder / "bad"]
    code, _, err = run_cli(args + ["method=lora"], capsys)
    one_line_error(code, err, 2, "clip-classifier trains with method full (probe: true for a linear probe)")
    code, _, err = run_cli(args + ["data.train=shapes:train:10"], capsys)
    one_line_error(code, err, 2, "is not a labelled image folder")
    assert not (folder / "bad").exists()
