"""`mmgen train clip` end to end on tiny shapes and on a table with bad samples; `mmgen eval clip`, `mmgen zeroshot`."""

import json

import pytest
import yaml

import mmgen
from mmgen import cli
from mmgen.clip import CLIP
from mmgen.data.shapes import ShapesDataset
from tests.test_cli import one_line_error, run_cli

TINY_CLIP = {
    "model": {
        "embed_dim": 32,
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2},
    },
    "data": {"train": "shapes:train:256", "val": "shapes:val:64", "cache": True, "zeroshot": "shapes",
             "retrieval": "shapes:val", "eval_samples": 64},
    "train": {"batch_size": 16, "max_steps": 6, "lr": 1e-3, "warmup_steps": 1, "eval_every": 3, "eval_batches": 2,
              "log_every": 3, "checkpoint_every": 3, "tensorboard": False, "progress": False, "seed": 5},
}


def write_config(tmp_path, **sections):
    config = {name: dict(values) for name, values in TINY_CLIP.items()}
    for name, values in sections.items():
        config[name].update(values)
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    run = folder / "run"
    assert cli.main(["train", "clip", "--config", str(write_config(folder)), "--out", str(run)]) == 0
    return run


def test_training_logs_held_out_metrics_and_writes_a_clip(clip_run):
    records = [json.loads(line) for line in (clip_run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "zeroshot/top1" in r]
    assert [r["step"] for r in evaluations] == [3, 6]
    for key in ("val/loss", "zeroshot/top5", "t2i/R@1", "i2t/R@10"):
        assert 0 <= evaluations[-1][key] <= (10 if key == "val/loss" else 1)
    assert isinstance(mmgen.load(clip_run), CLIP)


def test_eval_clip_json(clip_run, capsys):
    code, out, _ = run_cli(["eval", "clip", "--checkpoint", clip_run, "--zeroshot-dir", "shapes", "--retrieval",
                            "shapes:val", "--max-samples", 50, "--json"], capsys)
    assert code == 0
    metrics = json.loads(out)
    assert {"zeroshot/top1", "zeroshot/top5", "t2i/R@1", "t2i/R@5", "t2i/R@10", "i2t/R@1"} <= set(metrics)


def test_eval_clip_measures_the_images_training_logged_whatever_the_seed(clip_run, capsys):
    # the run trained with seed 5; `mmgen eval clip` knows no training seed: both use the same held-out images
    logged = [json.loads(line) for line in (clip_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "zeroshot/top1" in r][-1]
    code, out, _ = run_cli(["eval", "clip", "--checkpoint", clip_run, "--zeroshot-dir", "shapes", "--retrieval",
                            "shapes:val", "--max-samples", 64, "--json"], capsys)
    assert code == 0
    metrics = json.loads(out)
    for key in ("zeroshot/top1", "zeroshot/top5", "t2i/R@1", "i2t/R@1"):
        assert metrics[key] == pytest.approx(logged[key], abs=1e-6), key


def test_eval_clip_on_a_labelled_folder(clip_run, tmp_path, capsys):
    shapes = ShapesDataset("train", 12, 40, seed=3)
    for index in range(12):
        colour_shape = shapes.attributes(index)
        folder = tmp_path / "labelled" / f"{colour_shape['colour']}_{colour_shape['shape']}"
        folder.mkdir(parents=True, exist_ok=True)
        shapes.image(index).save(folder / f"{index}.png")
    code, out, _ = run_cli(["eval", "clip", "--checkpoint", clip_run, "--zeroshot-dir", tmp_path / "labelled"], capsys)
    assert code == 0 and "zeroshot/top1" in out and "%" in out


def test_zeroshot_command_reports_each_image_and_bad_files(clip_run, tmp_path, capsys):
    shapes = ShapesDataset("train", 3, 48, seed=1)
    for index in range(3):
        shapes.image(index).convert("RGBA").save(tmp_path / f"shape{index}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    code, out, err = run_cli(["zeroshot", "--checkpoint", clip_run, "--classes", "red circle,blue square,green star",
                              "--top-k", 2, tmp_path], capsys)
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all(line.count(",") == 1 for line in lines)
    assert "broken.png: unreadable image" in err and "1 image(s) could not be read" in err
    code, _, err = run_cli(["zeroshot", "--checkpoint", clip_run, "--classes", "a,a", tmp_path / "shape0.png"], capsys)
    one_line_error(code, err, 1, "distinct")


def test_wrong_model_types(clip_run, tmp_path, capsys, tiny_lm_config):
    code, _, err = run_cli(["sample", "lm", "--checkpoint", clip_run], capsys)
    one_line_error(code, err, 1, "not a language model")
    lm_run = tmp_path / "lm"
    assert cli.main(["train", "lm", "--config", str(tiny_lm_config), "--out", str(lm_run), "train.max_steps=2"]) == 0
    capsys.readouterr()
    code, _, err = run_cli(["eval", "clip", "--checkpoint", lm_run, "--zeroshot-dir", "shapes"], capsys)
    one_line_error(code, err, 1, "not CLIP")


def make_table(tmp_path, good: int = 40):
    shapes = ShapesDataset("train", good, 36, seed=2)
    rows = []
    for index in range(good):
        shapes.image(index).save(tmp_path / f"{index}.png")
        rows.append((f"{index}.png", shapes[index]["caption"]))
    full = tmp_path / "0.png"
    (tmp_path / "truncated.png").write_bytes(full.read_bytes()[:60])
    rows += [("truncated.png", "a small red circle"), ("missing.png", "a large blue star"), ("1.png", "  ")]
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\n" + "".join(f'{image},"{caption}"\n' for image, caption in rows))
    return table


def test_bad_samples_are_skipped_counted_and_reported(tmp_path, capsys):
    table = make_table(tmp_path)
    config = write_config(tmp_path, data={"train": str(table), "val": None, "cache": False, "zeroshot": None,
                                          "retrieval": str(table), "eval_samples": 16, "max_bad_fraction": 0.5},
                          train={"max_steps": 8, "batch_size": 8})
    code, _, err = run_cli(["train", "clip", "--config", config, "--out", tmp_path / "run"], capsys)
    assert code == 0
    assert "warning: skipping unreadable samples" in err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("data/skipped_total", 0) for r in records) >= 1


def test_too_many_bad_samples_stop_the_run_with_examples(tmp_path, capsys):
    table = make_table(tmp_path, good=12)
    config = write_config(tmp_path, data={"train": str(table), "val": None, "cache": False, "zeroshot": None,
                                          "retrieval": None, "max_bad_fraction": 0.0},
                          train={"max_steps": 12, "batch_size": 8})
    code, _, err = run_cli(["train", "clip", "--config", config, "--out", tmp_path / "run"], capsys)
    assert code == 1
    message = err.strip().splitlines()[-1]
    assert message.startswith("mmgen: error:") and "data.max_bad_fraction" in message
    assert "truncated" in message or "missing" in message or "empty caption" in message
    assert not (tmp_path / "run" / "final").exists()


def test_missing_data_path_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path, data={"train": str(tmp_path / "nowhere.csv"), "cache": False})
    code, _, err = run_cli(["train", "clip", "--config", config, "--out", tmp_path / "run"], capsys)
    one_line_error(code, err, 1, "data path not found")


def test_convert_open_clip_cli_errors_are_one_line(tmp_path, capsys):
    code, _, err = run_cli(["convert", "open-clip", "--model", "ViT-B-32", "--pretrained", tmp_path / "missing.pt",
                            "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, 1, "missing.pt")
    code, _, err = run_cli(["convert", "open-clip", "--model", "NoSuchNet", "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, 1, "NoSuchNet")
    assert not (tmp_path / "out").exists()


def test_train_script_runs_like_the_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "train" / "clip.py"
    config = write_config(tmp_path, data={"zeroshot": None, "retrieval": None, "val": None},
                          train={"max_steps": 2, "eval_every": 0, "checkpoint_every": 0})
    result = subprocess.run([sys.executable, str(script), "--config", str(config), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert isinstance(mmgen.load(tmp_path / "run"), CLIP)


def test_shapes_prompt_ensemble_is_every_caption_form_naming_colour_and_shape():
    from itertools import product

    from mmgen.data import shapes
    from mmgen.recipes.clip import SHAPES_TEMPLATES

    prompts = {template.format("red circle") for template in SHAPES_TEMPLATES}
    expected = {shapes.caption({"shape": "circle", "colour": "red", "size": size, "position": position}, omit)
                for size, position in product(shapes.SIZES, shapes.POSITIONS)
                for omit in ((), ("size",), ("position",), ("size", "position"))}
    assert prompts == expected and len(SHAPES_TEMPLATES) == len(expected) == 30
