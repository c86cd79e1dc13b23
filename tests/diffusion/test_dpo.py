"""Diffusion-DPO (mmgen.diffusion.dpo): log 2 at the start, one noise and timestep per pair, the gradient's sign,
the LoRA reference, the shape pairs and `mmgen finetune diffusion` with objective dpo."""

import json
import math
from pathlib import Path

import pytest
import torch

from mmgen import cli
from mmgen.config import from_dict, load_yaml
from mmgen.data.shape_pairs import ShapePreferencePairs
from mmgen.data.shapes import ShapesDataset, caption
from mmgen.diffusion.dpo import DiffusionDPOConfig, DiffusionDPOLoss, diffusion_dpo_loss
from mmgen.finetune import LoRAConfig, add_lora
from mmgen.recipes.finetune_diffusion import DiffusionFinetuneRecipe, preference_datasets
from tests.clip.helpers import random_tokens
from tests.diffusion.helpers import tiny_text2img
from tests.finetune.helpers import FAST_TRAIN, write_yaml
from tests.test_cli import one_line_error, run_cli

LORA = LoRAConfig(rank=2, targets=["attn", "conv"])


def pair_batch(pairs: int = 3, size: int = 8) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"images": torch.rand(pairs, 3, size, size, generator=generator) * 2 - 1,
            "losers": torch.rand(pairs, 3, size, size, generator=generator) * 2 - 1,
            "tokens": random_tokens(pairs, 16, generator)}


class Recorder(torch.nn.Module):
    """Calls `model` and keeps its inputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x_t, t, tokens):
        self.calls.append((x_t, t, tokens))
        return self.model(x_t, t, tokens)


def test_loss_is_the_written_out_formula():
    generator = torch.Generator().manual_seed(0)
    policy, reference = torch.rand(8, generator=generator), torch.rand(8, generator=generator)
    loss, metrics = diffusion_dpo_loss(policy, reference, beta=3.0)
    logits = [(reference[i] - reference[i + 4]).item() - (policy[i] - policy[i + 4]).item() for i in range(4)]
    expected = sum(math.log(1 + math.exp(-3.0 * value)) for value in logits) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["dpo/reward_accuracy"].item() == sum(value > 0 for value in logits) / 4
    assert metrics["dpo/reward_margin"].item() == pytest.approx(3.0 * sum(logits) / 4, rel=1e-5)


def test_sft_term_is_the_written_out_formula():
    generator = torch.Generator().manual_seed(2)
    policy, reference = torch.rand(10, generator=generator), torch.rand(10, generator=generator)
    loss, metrics = diffusion_dpo_loss(policy, reference, beta=4.0, sft_weight=0.7)
    p, r = policy.double().tolist(), reference.double().tolist()
    logits = [(r[i] - r[i + 5]) - (p[i] - p[i + 5]) for i in range(5)]
    dpo = sum(math.log(1 + math.exp(-4.0 * value)) for value in logits) / 5
    sft = sum(p[i] - r[i] for i in range(5)) / 5
    assert loss.item() == pytest.approx(dpo + 0.7 * sft, rel=1e-6)
    assert metrics["dpo/sft"].item() == pytest.approx(sft, rel=1e-6)
    assert metrics["dpo/winner_error_ratio"].item() == pytest.approx(sum(p[:5]) / sum(r[:5]), rel=1e-6)
    assert metrics["dpo/loser_error_ratio"].item() == pytest.approx(sum(p[5:]) / sum(r[5:]), rel=1e-6)
    without, _ = diffusion_dpo_loss(policy, reference, beta=4.0)
    assert without.item() == pytest.approx(dpo, rel=1e-6) and abs(sft) > 1e-2  # the term counts


def test_sft_term_pulls_the_winners_error_down():
    policy = torch.rand(6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    reference = torch.rand(6, generator=torch.Generator().manual_seed(1))
    plain, _ = diffusion_dpo_loss(policy, reference, beta=2.0)
    with_sft, _ = diffusion_dpo_loss(policy, reference, beta=2.0, sft_weight=3.0)
    plain_grad, = torch.autograd.grad(plain, policy)
    sft_grad, = torch.autograd.grad(with_sft, policy)
    torch.testing.assert_close(sft_grad[:3] - plain_grad[:3], torch.full((3,), 3.0 / 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(sft_grad[3:], plain_grad[3:], atol=0, rtol=0)  # the losers' gradient is unchanged


def test_gradient_lowers_the_winners_error_and_raises_the_losers():
    policy = torch.rand(6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss, _ = diffusion_dpo_loss(policy, torch.rand(6, generator=torch.Generator().manual_seed(1)), beta=2.0)
    loss.backward()
    assert (policy.grad[:3] > 0).all() and (policy.grad[3:] < 0).all()  # descent: winners' errors fall, losers' rise


@pytest.mark.parametrize("method,sft_weight", [("lora", 0.0), ("full", 0.0), ("lora", 1000.0)])
def test_loss_is_log_2_at_the_start(method, sft_weight):
    model = tiny_text2img()
    if method == "lora":
        add_lora(model, LORA)  # B = 0: the adapted model computes what the base does
    objective = DiffusionDPOLoss(model, DiffusionDPOConfig(beta=2500.0, sft_weight=sft_weight))
    loss, metrics = objective(model.train(), pair_batch())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["dpo/reward_margin"].item() == 0
    loss.backward()
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.requires_grad and p.grad is not None) > 0


def test_winner_and_loser_share_noise_and_timestep():
    model = tiny_text2img()
    objective = DiffusionDPOLoss(model, DiffusionDPOConfig())
    policy = Recorder(model)
    batch = pair_batch(pairs=4)
    torch.manual_seed(3)
    objective(policy, batch)
    (x_t, t, tokens), = policy.calls
    assert torch.equal(t[:4], t[4:]) and len(set(t[:4].tolist())) > 1  # shared per pair, not across pairs
    assert torch.equal(tokens[:4], tokens[4:]) and torch.equal(tokens[:4], batch["tokens"])
    x0 = torch.cat([batch["images"], batch["losers"]])
    scaled_noise = x_t - objective.schedule.add_noise(x0, torch.zeros_like(x0), t)  # sqrt(1 - alpha_bar_t) * noise
    torch.testing.assert_close(scaled_noise[:4], scaled_noise[4:], atol=1e-6, rtol=1e-6)
    assert not torch.equal(x_t[:4], x_t[4:])


def test_lora_reference_is_the_base_with_adapters_disabled():
    base = tiny_text2img()
    model = add_lora(tiny_text2img(), LORA)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    objective = DiffusionDPOLoss(model, DiffusionDPOConfig())
    assert objective.reference.copy is None  # no second copy of the weights
    generator = torch.Generator().manual_seed(6)
    x_t, t, tokens = torch.randn(3, 3, 8, 8, generator=generator), torch.tensor([5, 50, 95]), pair_batch()["tokens"]
    with torch.no_grad():
        with objective.reference(model.train()) as reference:
            torch.testing.assert_close(reference(x_t, t, tokens), base(x_t, t, tokens), atol=1e-5, rtol=1e-5)
        assert model.training
        assert (model(x_t, t, tokens) - base(x_t, t, tokens)).abs().max() > 1e-3  # the adapters are back on


def test_a_few_steps_raise_the_margin():
    model = add_lora(tiny_text2img(), LORA)
    objective = DiffusionDPOLoss(model, DiffusionDPOConfig(beta=50.0))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = pair_batch()
    for step in range(4):
        torch.manual_seed(step)
        loss, _ = objective(model.train(), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.manual_seed(0)
    loss, metrics = objective(model, batch)
    assert loss.item() < math.log(2) and metrics["dpo/reward_margin"].item() > 0


def test_shape_pairs_differ_only_in_the_named_attribute():
    shapes = ShapesDataset("train", 24, 32, seed=3, normalize="minus_one_to_one")
    pairs = ShapePreferencePairs(shapes)
    mistakes = set()
    for index in range(len(pairs)):
        item = pairs[index]
        winner, (loser, mistake) = shapes.attributes(index), pairs.loser_attributes(index)
        assert item["caption"] == caption(winner)  # complete: names every attribute
        assert [key for key in winner if winner[key] != loser[key]] == [mistake] == [item["mistake"]]
        assert (loser["shape"], loser["colour"]) in shapes.pairs  # never a held-out pair in train
        differ = (item["image"] != item["loser"]).any(dim=0)
        assert 0 < differ.float().mean() < 0.5  # one shape changed; background, jitter and noise shared
        mistakes.add(mistake)
    assert mistakes == {"colour", "shape"}
    again = ShapePreferencePairs(ShapesDataset("train", 24, 32, seed=3, normalize="minus_one_to_one"))[5]
    assert torch.equal(again["loser"], pairs[5]["loser"]) and torch.equal(again["image"], pairs[5]["image"])


def test_every_held_out_caption_gets_a_loser():
    """Some held-out pairs share neither shape nor colour with another held-out pair: their losers come from every
    colour or shape (the DPO recipe's validation used to crash on the first such item)."""
    shapes = ShapesDataset("val", 200, 16, seed=0)
    pairs = ShapePreferencePairs(shapes)
    isolated = 0
    for index in range(len(pairs)):
        winner, (loser, mistake) = shapes.attributes(index), pairs.loser_attributes(index)
        assert [key for key in winner if winner[key] != loser[key]] == [mistake]
        isolated += (loser["shape"], loser["colour"]) not in shapes.pairs
    assert isolated > 0  # the case is exercised


@pytest.fixture
def dpo_config(tmp_path):
    tiny_text2img().save_pretrained(tmp_path / "base")
    config = {"method": "lora", "objective": "dpo", "dpo": {"beta": 100.0}, "lora": {"rank": 2, "targets": ["attn"]},
              "data": {"train": "shapes:train:16", "val": "shapes:val:8"},
              "samples": {"prompts": ["a red circle"], "count": 1, "steps": 2}, "train": FAST_TRAIN}
    return write_yaml(tmp_path / "dpo.yaml", config)


def test_objective_dpo_runs_and_logs_reward_accuracy_and_margin(tmp_path, dpo_config):
    assert cli.main(["finetune", "diffusion", "--base", str(tmp_path / "base"), "--config", str(dpo_config),
                     "--out", str(tmp_path / "run"), "train.checkpoint_every=0"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train/loss" in r]
    assert logged and all({"dpo/reward_accuracy", "dpo/reward_margin", "dpo/winner_error"} <= set(r) for r in logged)
    assert [r["step"] for r in records if "val/loss" in r] == [2, 4]
    assert sorted(p.name for p in (tmp_path / "run/final").iterdir()) == ["adapter.safetensors", "adapter_config.json"]


@pytest.mark.parametrize("override,fragment", [
    ("data.train=./pictures", "objective dpo builds its pairs from shapes data"),
    ("objective=ppo", "'objective' must be one of 'denoising' | 'dpo'"),
    ("dpo.beta=-1", "beta must be positive"),
    ("dpo.sft_weight=-0.5", "sft_weight must be zero or positive"),
])
def test_bad_dpo_configs_are_one_line_errors(tmp_path, dpo_config, capsys, override, fragment):
    (tmp_path / "pictures").mkdir()
    code, _, err = run_cli(["finetune", "diffusion", "--base", tmp_path / "base", "--config", dpo_config,
                            "--out", tmp_path / "bad", override], capsys)
    one_line_error(code, err, 2, fragment)


def test_the_shipped_config_validates():
    config = Path(__file__).resolve().parents[2] / "configs" / "finetune-diffusion-shapes-dpo.yaml"
    recipe = from_dict(DiffusionFinetuneRecipe, load_yaml(config))
    assert (recipe.objective, recipe.method, recipe.base) == ("dpo", "lora", "runs/diffusion-shapes")
    assert recipe.dpo.sft_weight > 0  # plain Diffusion-DPO degrades this model (docs/preference-tuning.md)
    train_set, val_set = preference_datasets(recipe.data, 32, recipe.train.seed)
    assert len(train_set) == 20000 and val_set.shapes.split == "val"
