"""RUN_DIR/best/ (train.best_metric): the model of the best evaluation, kept through a resume, never a worse one."""

import json
import shutil

import torch
from safetensors.torch import load_file

from mmgen.recipes import lm
from mmgen.run_folder import RunFolder
from mmgen.training.best import BestModel


def test_best_holds_the_model_of_the_lowest_val_loss(tmp_path, tiny_lm_config):
    run = tmp_path / "run"
    lm.train(tiny_lm_config, run, ["train.max_steps=20", "train.eval_every=5", "train.checkpoint_every=5",
                                   "train.keep_checkpoints=4", "train.best_metric=val/loss"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {record["step"]: record["val/loss"] for record in records if "val/loss" in record}
    best = json.loads((run / "best" / "best.json").read_text())
    best_step = min(losses, key=losses.get)
    assert best == {"metric": "val/loss", "value": losses[best_step], "step": best_step, "mode": "min"}
    assert sorted(path.name for path in (run / "best").iterdir()) == ["best.json", "config.json", "model.safetensors",
                                                                       "tokenizer.json"]
    saved = load_file(str(run / "best" / "model.safetensors"))
    folder = run / "final" if best_step == 20 else run / "checkpoints" / f"step-{best_step}"  # no step-20 checkpoint
    reference = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(saved[name], reference[name]) for name in reference)


def test_only_a_better_evaluation_replaces_best_also_after_a_resume(tmp_path):
    run = RunFolder(tmp_path / "run")
    written = []

    def save(model, folder):
        written.append(model)
        (folder / "config.json").write_text("{}")

    best = BestModel(run, "zeroshot/top1", None, save)
    assert best.mode == "max"
    for step, value in ((10, 0.5), (20, 0.7), (30, 0.6), (40, float("nan"))):
        best.consider({"zeroshot/top1": value, "val/loss": 1.0}, step, f"model@{step}", lambda line: None)
    assert written == ["model@10", "model@20"]
    assert json.loads((run.best / "best.json").read_text())["step"] == 20
    resumed = BestModel(run, "zeroshot/top1", None, save)  # reads best.json back
    resumed.consider({"zeroshot/top1": 0.65}, 50, "model@50", lambda line: None)
    resumed.consider({"zeroshot/top1": 0.75}, 60, "model@60", lambda line: None)
    assert written == ["model@10", "model@20", "model@60"]


def test_a_metric_the_run_does_not_report_is_named_once(tmp_path, capsys):
    best = BestModel(RunFolder(tmp_path / "run"), "val/acuracy", None, lambda model, folder: None)
    for step in (1, 2):
        assert best.consider({"val/loss": 1.0}, step, None) is None
    err = capsys.readouterr().err
    assert err.count("train.best_metric=val/acuracy is not among") == 1 and "val/loss" in err


def test_a_kill_between_the_renames_of_best_loses_nothing(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.best.mkdir(parents=True)
    (run.best / "best.json").write_text("{}")
    old = run.path / ".best.old-abc"
    old.mkdir()
    shutil.move(str(run.best), str(old / "best"))  # the state between atomic_folder's two renames
    run.clean()
    assert (run.best / "best.json").is_file() and not old.exists()
