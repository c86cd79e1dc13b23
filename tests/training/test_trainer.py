"""The Trainer through the LM recipe: metrics, checkpoints, exact resume, reproducibility."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mmgen.recipes import lm
from mmgen.text import GPT, GPTConfig
from mmgen.training import learning_rate, parameter_groups


def weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_run_folder_layout_and_metrics(tmp_path, tiny_lm_config):
    run = tmp_path / "run"
    lm.train(tiny_lm_config, run)
    assert sorted(p.name for p in (run / "final").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-10"]
    checkpoint = run / "checkpoints" / "step-10"
    assert {"config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json",
            "trainer_state.json", "rng-0.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]  # nothing half-written left over
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    val_records = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20]
    assert [r["step"] for r in val_records] == [10, 20]
    assert all(r["throughput/tokens_per_s"] > 0 and r["lr"] > 0 for r in train_records)
    assert train_records[-1]["train/loss"] < train_records[0]["train/loss"]  # it learns


def test_same_seed_same_weights(tmp_path, tiny_lm_config):
    lm.train(tiny_lm_config, tmp_path / "a", ["train.max_steps=6", "train.checkpoint_every=0"])
    lm.train(tiny_lm_config, tmp_path / "b", ["train.max_steps=6", "train.checkpoint_every=0"])
    lm.train(tiny_lm_config, tmp_path / "c", ["train.max_steps=6", "train.checkpoint_every=0", "train.seed=8"])
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert not torch.equal(weights(tmp_path / "a")["norm.weight"], weights(tmp_path / "c")["norm.weight"])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_lm_config, accumulation):
    overrides = ["model.dropout=0.2", f"train.grad_accum_steps={accumulation}"]  # dropout: RNG state must resume too
    lm.train(tiny_lm_config, tmp_path / "whole", overrides)
    interrupted = tmp_path / "interrupted"
    lm.train(tiny_lm_config, interrupted, overrides)
    # simulate a crash after the step-10 checkpoint: everything later is gone
    shutil.rmtree(interrupted / "final")
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    (interrupted / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 15, "train/lo')  # torn last line
    lm.train(None, interrupted, resume=True)
    assert_same_weights(weights(tmp_path / "whole"), weights(interrupted))
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(15) == 1


def test_parameter_groups_decay_only_matrices():
    model = GPT(GPTConfig(vocab_size=11, context_length=8, num_layers=2, num_heads=2, dim=16))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_learning_rate_schedule_matches_nanogpt():
    import math

    def nanogpt(it, lr=1e-3, min_lr=1e-4, warmup=100, decay_iters=2000):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (decay_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    for step in [0, 50, 99, 100, 500, 1999, 2000]:
        got = learning_rate(step, lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=2000)
        assert got == pytest.approx(nanogpt(step))
    assert learning_rate(500, lr=1e-3, min_lr=0, warmup_steps=10, max_steps=2000, schedule="constant") == 1e-3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_keeps_float32_weights(tmp_path, tiny_lm_config, precision):
    run = tmp_path / precision
    lm.train(tiny_lm_config, run, [f"train.mixed_precision={precision}", "train.max_steps=6", "train.checkpoint_every=0"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert all(loss == loss and loss < 10 for loss in losses)  # finite
    assert all(tensor.dtype == torch.float32 for tensor in weights(run).values())
