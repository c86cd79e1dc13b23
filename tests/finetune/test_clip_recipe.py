"""`mmgen finetune clip` on shapes with an extra shape: adapter runs, the new-class metric, --adapter on eval/zeroshot."""

import json

import numpy as np
import pytest

from mmgen import cli
from mmgen.data.shapes import render
from tests.finetune.helpers import CASES, FAST_TRAIN, write_yaml
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune-clip")
    CASES["clip"].build().save_pretrained(folder / "base")
    config = {"method": "lora", "lora": {"rank": 2, "targets": ["attn"]},
              "data": {"train": "shapes:train:64:extra=heart", "val": "shapes:val:16:extra=heart", "cache": True,
                       "zeroshot": "shapes:extra=heart", "retrieval": None, "eval_samples": 48},
              "train": dict(FAST_TRAIN, batch_size=8, checkpoint_every=0)}
    assert cli.main(["finetune", "clip", "--base", str(folder / "base"), "--config",
                     str(write_yaml(folder / "clip.yaml", config)), "--out", str(folder / "run")]) == 0
    return folder


def test_clip_adapter_run_logs_zero_shot_accuracy_on_the_new_shape(folder):
    run = folder / "run"
    assert sorted(p.name for p in (run / "final").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "zeroshot/top1" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    assert all(0 <= r["zeroshot/new_top1"] <= 1 for r in evaluations)


def test_eval_and_zeroshot_take_the_adapter(folder, capsys, tmp_path):
    arguments = ["--zeroshot-dir", "shapes:extra=heart", "--max-samples", 48, "--json"]
    code, out, _ = run_cli(["eval", "clip", "--checkpoint", folder / "base", "--adapter", folder / "run", *arguments],
                           capsys)
    adapted = json.loads(out)
    assert code == 0 and {"zeroshot/top1", "zeroshot/new_top1"} <= set(adapted)
    code, out, _ = run_cli(["eval", "clip", "--checkpoint", folder / "base", *arguments], capsys)
    assert code == 0 and set(json.loads(out)) == set(adapted)
    image = tmp_path / "heart.png"
    render({"shape": "heart", "colour": "red", "size": "large", "position": "center"}, 32).save(image)
    code, out, _ = run_cli(["zeroshot", "--checkpoint", folder / "base", "--adapter", folder / "run", "--classes",
                            "red heart,red circle", image], capsys)
    probabilities = [float(part.split()[-1]) for part in out.split(": ", 1)[1].split(", ")]
    assert code == 0 and np.isclose(sum(probabilities), 1.0, atol=1e-3)
