"""Locked towers (LiT, last-N-layers), patch dropout and per-tower gradient checkpointing of the CLIP recipes."""

import copy

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmgen.clip.objective import ContrastiveObjective
from mmgen.clip.patch_dropout import drop_patches
from mmgen.clip.towers import TowerTraining, apply_tower_training
from mmgen.training.optim import make_optimizer
from tests.test_cli import one_line_error, run_cli

from .helpers import make_clip, random_tokens
from .test_recipe import write_config


def batch(size: int = 6, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(size, 3, 32, 32, generator=generator), "tokens": random_tokens(size, 16, generator)}


def train_steps(model, steps: int = 3) -> None:
    optimizer = make_optimizer(model, 1e-2, 0.1, (0.9, 0.99))
    objective = ContrastiveObjective("infonce")
    for step in range(steps):
        objective(model, batch(seed=step))[0].backward()
        optimizer.step()
        optimizer.zero_grad()


def changed(before, after) -> set[str]:
    old = dict(before.named_parameters())
    return {name for name, p in after.named_parameters() if not torch.equal(p, old[name])}


def test_locked_image_tower_stays_unchanged_and_the_text_tower_trains():
    model = make_clip().train()
    initial = copy.deepcopy(model)
    apply_tower_training(model, TowerTraining(lock_image=True))
    train_steps(model)
    moved = changed(initial, model)
    assert not any(name.startswith("vision.") for name in moved)  # weight decay included: frozen means frozen
    assert {name for name, _ in model.text.named_parameters(prefix="text")} <= moved
    assert "logit_scale" in moved


def test_last_layers_stay_unlocked():
    model = make_clip().train()
    initial = copy.deepcopy(model)
    apply_tower_training(model, TowerTraining(lock_text=True, text_unlocked_layers=1))
    train_steps(model)
    text_moved = {name for name in changed(initial, model) if name.startswith("text.")}
    last = len(model.text.transformer.blocks) - 1
    expected = {name for name, _ in model.text.named_parameters(prefix="text")
                if name.startswith((f"text.transformer.blocks.{last}.", "text.norm_final", "text.projection"))}
    assert text_moved == expected and expected
    assert any(name.startswith("vision.") for name in changed(initial, model))


def test_patch_dropout_keeps_the_class_token_and_is_off_in_evaluation():
    tokens = torch.randn(3, 17, 8)
    kept = drop_patches(tokens, 0.75)
    assert kept.shape == (3, 5, 8)
    assert torch.equal(kept[:, 0], tokens[:, 0])
    for row in range(3):  # every kept token is one of the row's patches, each at most once
        matches = (kept[row, 1:, None, :] == tokens[row, None, 1:, :]).all(-1)
        assert matches.sum(-1).eq(1).all() and matches.any(0).sum() == 4

    model = make_clip()
    reference = copy.deepcopy(model)
    apply_tower_training(model, TowerTraining(patch_dropout=0.5))
    images = batch()["images"]
    model.eval()
    torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), atol=0, rtol=0)
    model.train()
    reference.train()
    assert not torch.allclose(model.encode_image(images), reference.encode_image(images), atol=1e-3)


def test_gradient_checkpointing_per_tower_gives_the_same_gradients():
    model = make_clip().train()
    reference = copy.deepcopy(model)
    apply_tower_training(model, TowerTraining(image_gradient_checkpointing=True))
    assert model.vision.transformer.gradient_checkpointing and not model.text.transformer.gradient_checkpointing
    for clip in (model, reference):
        ContrastiveObjective("siglip")(clip, batch())[0].backward()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_lit_finetuning_of_a_model_folder_trains_only_the_text_tower(tmp_path, capsys):
    base = tmp_path / "base"
    make_clip().save_pretrained(base)  # e.g. a converted open_clip model
    config = tmp_path / "lit.yaml"
    tiny = yaml.safe_load(write_config(tmp_path).read_text())
    config.write_text(yaml.safe_dump({"method": "full", "data": tiny["data"] | {"zeroshot": None, "retrieval": None},
                                      "train": tiny["train"] | {"max_steps": 2, "checkpoint_every": 0,
                                                                "grad_accum_steps": 2, "batch_size": 8},
                                      "towers": {"lock_image": True, "patch_dropout": 0.25}}))
    code, out, _ = run_cli(["finetune", "clip", "--base", base, "--config", config, "--out", tmp_path / "run"], capsys)
    assert code == 0
    assert "locked towers:" in out and "accumulation=cached-features" in out
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    for name in before:
        assert torch.equal(before[name], after[name]) == name.startswith("vision."), name


@pytest.mark.parametrize("override, fragment", [
    ("towers.patch_dropout=1.0", "patch_dropout must lie in [0, 1)"),
    ("towers.text_unlocked_layers=1", "needs lock_text: true"),
    ("towers.image_unlocked_layers=5", "has only 1 layers"),
    ("accumulation=both", "accumulation"),
])
def test_bad_tower_options_are_one_line(tmp_path, capsys, override, fragment):
    extra = ["towers.lock_image=true"] if "image_unlocked" in override else []
    code, _, err = run_cli(["train", "clip", "--config", write_config(tmp_path), "--out", tmp_path / "run",
                            *extra, override], capsys)
    one_line_error(code, err, 2, fragment)


def test_locks_with_lora_are_one_line_and_write_nothing(tmp_path, capsys):
    base = tmp_path / "base"
    make_clip().save_pretrained(base)
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump({"method": "lora", "towers": {"lock_image": True}}))
    code, _, err = run_cli(["finetune", "clip", "--base", base, "--config", config, "--out", tmp_path / "run"], capsys)
    one_line_error(code, err, 2, "need method: full")
    assert not (tmp_path / "run").exists()
