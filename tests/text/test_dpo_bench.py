"""bench/dpo.py end to end on a tiny trained GPT: pairs from its own samples by the 'e' rule, DPO, before/after."""

import argparse
import importlib
import json
from pathlib import Path

from mmgen.recipes import lm
from tests.conftest import TINY_LM, make_corpus
from tests.finetune.helpers import write_yaml

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_pairs_follow_the_rule(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("dpo")
    pairs = bench.preference_pairs(["p1", "p2"], [["eee", "abc", "Ee"], ["xy", "zz"]])
    assert pairs == [("p1", "abc", "eee")]  # fewest vs most 'e' (either case); a tie gives no pair
    assert bench.rule_figures([["abc", "eEe"]]) == {"e_free_rate": 0.5, "e_per_100_chars": 50.0}


def test_tiny_run_reports_the_rule_and_val_loss_before_and_after(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("dpo")
    (tmp_path / "corpus.txt").write_text(make_corpus())
    config = {name: dict(values) for name, values in TINY_LM.items()}
    config["data"]["path"] = str(tmp_path / "corpus.txt")
    lm.train(write_yaml(tmp_path / "lm.yaml", config), tmp_path / "base", ["train.max_steps=2",
                                                                           "train.checkpoint_every=0"])
    args = argparse.Namespace(base=tmp_path / "base", base_steps=0, text=tmp_path / "corpus.txt", pairs=16,
                              eval_prompts=4, samples=4, prompt_length=6, length=6, val_windows=8, steps=2,
                              override=["train.batch_size=4", "train.eval_every=1", "train.eval_batches=1"],
                              seed=0, threads=1, work=tmp_path / "work")
    results = bench.run(args)
    assert 0 < results["pairs"] <= 16 and results["dpo"]["steps"] == 2
    for stage in ("before", "after"):
        figures = results[stage]
        assert 0 <= figures["e_free_rate"] <= 1 and figures["e_per_100_chars"] >= 0 and figures["val_loss"] > 0
    assert results["dpo"]["last_val_reward_accuracy"] is not None
    assert results["after"] != results["before"]  # the adapter was loaded and changed the samples or the loss
    json.dumps(results)
