"""bench/diffusion_dpo.py end to end on a tiny random model (--tiny), with a stand-in judge: Diffusion-DPO runs,
and every checkpoint's samples are judged against their held-out prompts."""

import argparse
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

from mmgen.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES

BENCH = Path(__file__).resolve().parents[2] / "bench"


class FirstLabelJudge:
    """Reads every image as the first label of each head (the bench's wiring is under test, not a judge)."""

    config = SimpleNamespace(image_size=32)
    report = {"stand-in": True}

    def predict(self, images):
        labels = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
        return {name: [values[0]] * len(images) for name, values in labels.items()}


def test_tiny_run_judges_the_base_and_every_checkpoint(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("diffusion_dpo")
    monkeypatch.setattr(bench, "load_or_train_judge", lambda *args, **kwargs: FirstLabelJudge())
    args = argparse.Namespace(base=None, tiny=True, steps=2, override=["train.checkpoint_every=1", "dpo.sft_weight=10"], prompts=3,
                              setting="ddim:2:1.5", batch_size=8, seed=0, threads=1, judge_size=32,
                              judge_cache=None, work=tmp_path / "work")
    results = bench.run(args)
    assert [row["dpo_steps"] for row in results["rows"]] == [0, 1, 2]
    assert results["held_out_prompts"] == 3
    for row in results["rows"]:
        assert set(row["fidelity"]) >= {"shape+colour", "shape", "colour"}
        assert all(0.0 <= value <= 1.0 for value in row["fidelity"].values())
    assert results["rows"][-1]["train_reward_accuracy"] is not None  # read back from the run's metrics
    assert results["rows"][-1]["train_winner_error_ratio"] > 0 and results["rows"][-1]["train_loser_error_ratio"] > 0
    assert results["rows"][0]["train_winner_error_ratio"] is None  # the base: nothing logged yet
    assert (tmp_path / "work/dpo/final/adapter.safetensors").is_file()
    lines = bench.table(results).splitlines()
    assert len(lines) == 4 and "winner err x" in lines[0]
    assert len(lines[1].split()) == 1 + 5 and len(lines[-1].split()) == 1 + 5 + 4  # the base row: nothing logged
    json.dumps(results)
