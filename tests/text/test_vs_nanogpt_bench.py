"""bench/vs_nanogpt.py without running nanoGPT: arguments, the checkout check, the command lines, parsing, order."""

import importlib
import json
import sys
from pathlib import Path

import pytest

from mmgen.errors import UserError

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("vs_nanogpt")


def fake_checkout(root: Path, text: str) -> Path:
    for name in ("train.py", "model.py", "config/train_shakespeare_char.py", "data/shakespeare_char/train.bin",
                 "data/shakespeare_char/val.bin"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    (root / "data/shakespeare_char/input.txt").write_text(text)
    return root


def test_nanogpt_command_is_the_documented_cpu_run(bench, tmp_path):
    command = bench.nanogpt_command(2000, tmp_path / "out")
    assert command[:3] == [sys.executable, "train.py", "config/train_shakespeare_char.py"]
    flags = dict(item[2:].split("=", 1) for item in command[3:])
    assert flags == {"device": "cpu", "compile": "False", "eval_iters": "20", "log_interval": "1", "block_size": "64",
                     "batch_size": "12", "n_layer": "4", "n_head": "4", "n_embd": "128", "dropout": "0.0",
                     "max_iters": "2000", "lr_decay_iters": "2000", "out_dir": str(tmp_path / "out")}
    short = dict(item[2:].split("=", 1) for item in bench.nanogpt_command(300, tmp_path)[3:])
    assert (short["max_iters"], short["lr_decay_iters"], short["eval_interval"]) == ("300", "300", "300")


def test_mmgen_command_matches_the_steps(bench, tmp_path):
    command = bench.mmgen_command(123, tmp_path / "run")
    assert command[1:5] == ["-m", "mmgen.cli", "train", "lm"]
    assert command[command.index("--config") + 1] == str(bench.CONFIG) and bench.CONFIG.is_file()
    assert "train.max_steps=123" in command and command[command.index("--out") + 1] == str(tmp_path / "run")
    assert not any(part.startswith("train.max_steps=") for part in bench.mmgen_command(None, tmp_path / "run"))
    assert bench.recipe_steps() < 2000  # the recipe gets to nanoGPT's val loss in fewer steps than nanoGPT's 2000


def test_arguments(bench, capsys):
    args = bench.parse_args(["--nanogpt", "/x"])
    assert (args.nanogpt, args.steps, args.threads, args.order) == (Path("/x"), 2000, 1, "both")
    for bad in (["--nanogpt", "/x", "--steps", "0"], ["--nanogpt", "/x", "--threads", "two"], ["--steps", "5"],
                ["--nanogpt", "/x", "--order", "sideways"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(bad)
        assert exit_info.value.code == 2
    assert "expected a whole number" in capsys.readouterr().err


def test_checkout_check_names_what_is_missing(bench, tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    root = fake_checkout(tmp_path / "nanoGPT", text)
    bench.check_checkout(root, text)  # complete: no error
    with pytest.raises(UserError, match="not the Tiny Shakespeare"):
        bench.check_checkout(root, text + "more")
    (root / "data/shakespeare_char/val.bin").unlink()
    with pytest.raises(UserError, match=r"val\.bin is missing; copy Tiny Shakespeare .* prepare\.py"):
        bench.check_checkout(root, text)
    (root / "train.py").unlink()
    with pytest.raises(UserError, match=r"no train\.py"):
        bench.check_checkout(root, text)


def test_val_losses_are_read_from_the_last_evaluation(bench, tmp_path):
    output = ("step 0: train loss 4.1676, val loss 4.1649\niter 0: loss 4.1, time 10ms\n"
              "step 250: train loss 2.01, val loss 2.0567\nsaving checkpoint to out\n")
    assert bench.last_nanogpt_val(output) == (250, 2.0567)
    with pytest.raises(UserError, match="val loss"):
        bench.last_nanogpt_val("iter 0: loss 4.1\n")
    records = [{"step": 250, "val/loss": 2.5}, {"step": 300, "train/loss": 2.2}, {"step": 300, "val/loss": 2.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench.last_mmgen_val(tmp_path) == (300, 2.25)


def test_timed_sets_threads_and_reports_a_failure(bench, tmp_path):
    wall, out = bench.timed([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"], tmp_path, 3)
    assert out.strip() == "3" and wall > 0
    with pytest.raises(UserError, match="failed .*boom"):
        bench.timed([sys.executable, "-c", "raise SystemExit('boom')"], tmp_path, 1)


def test_both_orders_run_each_command_twice_and_report_ratios(bench, tmp_path, monkeypatch):
    text = "To be, or not to be: that is the question.\n"
    (tmp_path / "input.txt").write_text(text)
    monkeypatch.setattr("mmgen.data.text.tiny_shakespeare_path", lambda download=True: tmp_path / "input.txt")
    calls = []
    walls = {"nanogpt": 10.0, "mmgen": 8.0}

    def fake(name):
        def run(args, scratch, corpus):
            assert corpus == text and args.steps == 7 and args.threads == 2
            calls.append(name)
            return {"wall_s": walls[name] + len(calls), "val_loss_printed": 1.5}
        return run

    monkeypatch.setattr(bench, "run_nanogpt", fake("nanogpt"))
    monkeypatch.setattr(bench, "run_mmgen", fake("mmgen"))
    root = fake_checkout(tmp_path / "nanoGPT", text)
    out = tmp_path / "result.json"
    assert bench.main(["--nanogpt", str(root), "--steps", "7", "--mmgen-steps", "7", "--threads", "2",
                       "--json", str(out)]) == 0
    assert calls == ["nanogpt", "mmgen", "mmgen", "nanogpt"]
    results = json.loads(out.read_text())
    assert [r["ratio_mmgen_over_nanogpt"] for r in results["rounds"]] == [round(10 / 11, 3), round(11 / 14, 3)]
    assert results["ratio_mean"] == round((round(10 / 11, 3) + round(11 / 14, 3)) / 2, 3)
    assert "--max_iters=7" in results["nanogpt_command"] and "train.max_steps=7" in results["mmgen_command"]
    assert results["mmgen_command"].startswith("mmgen train lm --config ")
