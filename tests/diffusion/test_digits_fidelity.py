"""bench/digits_fidelity.py samples a text2img model per guidance scale, judges every sample against the digit its
prompt named, and writes one grid per scale (a tiny random model and a tiny judge here)."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.diffusion.helpers import tiny_text2img

pytest.importorskip("sklearn")
BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_fidelity_per_guidance_scale_with_grids(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    real_data = importlib.import_module("real_data")
    digits_judge = importlib.import_module("digits_judge")
    fidelity = importlib.import_module("digits_fidelity")
    real_data.write_digits(tmp_path / "digits", size=16, limit=60)
    config = digits_judge.DigitsJudgeConfig(image_size=16, widths=(8,), epochs=2, batch_size=32)
    judge = digits_judge.load_or_train_digits_judge(tmp_path / "digits", tmp_path / "judge", config=config,
                                                    progress=False)
    monkeypatch.setattr(fidelity, "load_or_train_digits_judge", lambda data, cache: judge)
    tiny_text2img().save_pretrained(tmp_path / "t2i")

    prompts, intended = fidelity.class_prompts(2)
    assert len(prompts) == 20 and intended[:4] == [0, 0, 1, 1]
    assert prompts[14] == "a handwritten digit seven" and prompts[15] == "the number 7"

    args = argparse.Namespace(checkpoint=tmp_path / "t2i", data=tmp_path / "digits", guidance=[1.0, 3.0],
                              per_class=2, sampler="ddim", steps=2, batch_size=20, seed=0, device="cpu",
                              judge_cache=None, grid_dir=tmp_path / "grids")
    results = fidelity.run(args)
    assert [row["guidance_scale"] for row in results["guidance"]] == [1.0, 3.0]
    for row in results["guidance"]:
        assert 0.0 <= row["overall"] <= 1.0 and len(row["per_class"]) == 10
        with Image.open(row["grid"]) as grid:
            assert grid.height == 10 * (32 + 2)  # one row per digit
    assert results["judge"]["held_out_accuracy"] == judge.report["held_out_accuracy"]
    json.dumps(results)  # the results file is JSON
    fidelity.print_table(results)
    assert "guidance" in capsys.readouterr().out


def test_fidelity_help(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", ["digits_fidelity.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module("digits_fidelity").main()
    assert exit_info.value.code == 0 and "--per-class" in capsys.readouterr().out
