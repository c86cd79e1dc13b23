"""`mmgen train clip` with data.cache on a table: bad samples logged as without the cache, exact resume with crops."""

import json
import shutil

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from mmgen import cli

from .helpers import random_caption, random_image, write_table

TINY_CLIP = {
    "model": {
        "embed_dim": 16,
        "vision": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "heads": 2},
        "text": {"context_length": 16, "width": 16, "layers": 1, "heads": 2},
    },
    "data": {"val": None, "zeroshot": None, "retrieval": None, "crop_scale": [0.3, 0.8], "max_bad_fraction": 0.5},
    "train": {"batch_size": 8, "max_steps": 6, "lr": 1e-3, "warmup_steps": 1, "eval_every": 0, "log_every": 1,
              "checkpoint_every": 3, "tensorboard": False, "progress": False, "seed": 3},
}


def write_config(folder, table, cache: bool):
    config = {name: dict(values) for name, values in TINY_CLIP.items()}
    config["data"].update(train=str(table), cache=cache)
    path = folder / f"clip-{cache}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def make_table(folder, good: int = 21, missing=(4, 5, 13)):
    rng = np.random.default_rng(1)
    rows = []
    for row in range(good + len(missing)):
        name = f"gone-{row}.png" if row in missing else f"{row}.png"
        if row not in missing:
            random_image(rng, "RGB").save(folder / name)  # 11..79 pixels a side: most are shrunk by the cache
        rows.append({"image": name, "caption": random_caption(rng)})
    write_table(folder / "table.csv", rows)
    return folder / "table.csv"


def train(config, run, *extra):
    assert cli.main(["train", "clip", "--config", str(config), "--out", str(run), *extra]) == 0


def skipped_totals(run) -> list:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("data/skipped_total", 0)) for r in records if "train/loss" in r]


def test_bad_samples_are_logged_the_same_with_and_without_the_cache(tmp_path, capsys):
    table = make_table(tmp_path)
    train(write_config(tmp_path, table, cache=False), tmp_path / "off")
    train(write_config(tmp_path, table, cache=True), tmp_path / "on")
    with_cache = skipped_totals(tmp_path / "on")
    assert with_cache == skipped_totals(tmp_path / "off") and with_cache[-1][1] >= 1
    assert capsys.readouterr().err.count("warning: skipping unreadable samples") == 2


def test_a_cached_run_with_random_crops_resumes_exactly(tmp_path):
    config = write_config(tmp_path, make_table(tmp_path), cache=True)
    train(config, tmp_path / "whole")
    interrupted = tmp_path / "interrupted"
    train(config, interrupted)
    shutil.rmtree(interrupted / "final")  # a crash after the step-3 checkpoint
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    (interrupted / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= 3))
    assert cli.main(["train", "clip", "--resume", str(interrupted)]) == 0
    whole = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    resumed = load_file(str(interrupted / "final" / "model.safetensors"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[name], resumed[name]) for name in whole)
