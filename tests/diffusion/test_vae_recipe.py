"""`mmgen train vae` on tiny shapes (PSNR, grids, a measured scaling factor) and `mmgen convert diffusers-vae`."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import mmgen
from mmgen import cli
from mmgen.config import from_dict, load_yaml
from mmgen.diffusion.vae import VAE, VAEConfig
from mmgen.recipes.vae import VAERecipe, measure_scaling_factor
from tests.diffusion.test_vae import diffusers_vae
from tests.test_cli import one_line_error, run_cli

TINY_VAE = {
    "model": {"image_size": 16, "base_channels": 8, "channel_multipliers": [1, 2], "blocks_per_level": 1,
              "groups": 4, "latent_channels": 4},
    "data": {"train": "shapes:train:48", "val": "shapes:val:16", "cache": True},
    "loss": {"reconstruction": "l1", "kl_weight": 1.0e-6},
    "evaluation": {"grid_images": 3, "scaling_batches": 2},
    "train": {"batch_size": 8, "max_steps": 4, "lr": 2e-3, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1,
              "log_every": 2, "checkpoint_every": 2, "ema_decay": 0.9, "tensorboard": False, "progress": False},
}


def write_config(folder: Path, **sections) -> Path:
    config = {name: {**values, **sections.get(name, {})} for name, values in TINY_VAE.items()}
    path = folder / "vae.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    assert cli.main(["train", "vae", "--config", str(write_config(folder)), "--out", str(folder / "run")]) == 0
    return folder / "run"


def test_training_logs_psnr_and_grids_and_stores_the_measured_scaling_factor(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val/psnr" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    assert all(0 < r["val/psnr"] < 100 and "val/loss" in r for r in evaluations)
    assert all("loss/reconstruction" in r and "loss/kl" in r for r in records if "train/loss" in r)
    for record in evaluations:  # 3 originals above their reconstructions, 16 px each
        assert Image.open(trained / record["samples/grid"]).size == (3 * 18 + 2, 2 * 18 + 2)
    stored = json.loads((trained / "final" / "config.json").read_text())["config"]["scaling_factor"]
    assert stored != 1.0 and stored == pytest.approx(evaluations[-1]["vae/scaling_factor"])
    model = mmgen.load(trained)
    assert isinstance(model, VAE) and model.config.scaling_factor == stored
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved["model"]["image_size"] == 16 and saved["loss"]["reconstruction"] == "l1"


def test_the_measured_factor_brings_the_latents_to_unit_std():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(base_channels=8, channel_multipliers=(1, 2), blocks_per_level=1, groups=4)).eval()
    batches = [torch.rand(4, 3, 8, 8) * 2 - 1 for _ in range(2)]
    vae.config.scaling_factor = measure_scaling_factor(vae, batches, seed=3)
    generator = torch.Generator().manual_seed(3)
    latents = torch.cat([vae.encode_latents(images, generator) for images in batches])
    assert vae.config.scaling_factor != 1.0 and latents.std().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("sections, code, fragment", [
    ({"loss": {"reconstruction": "l3"}}, 2, "'loss.reconstruction' must be one of 'l1' | 'mse'"),
    ({"model": {"image_size": 15}}, 2, "image_size must be a positive multiple of the downsampling factor 2"),
    ({"evaluation": {"scaling_batches": 0}}, 2, "scaling_batches >= 1"),
    ({"data": {"train": "missing.csv"}}, 1, "data path not found"),
])
def test_bad_configs_give_one_line(tmp_path, capsys, sections, code, fragment):
    result = run_cli(["train", "vae", "--config", write_config(tmp_path, **sections), "--out", tmp_path / "run"],
                     capsys)
    one_line_error(result[0], result[2], code, fragment)
    assert not (tmp_path / "run").exists()


def test_shipped_config_is_valid():
    recipe = from_dict(VAERecipe, load_yaml(Path(__file__).resolve().parents[2] / "configs" / "vae-shapes.yaml"))
    assert recipe.model.image_size // recipe.model.downsampling_factor == 16 and recipe.model.latent_channels == 4


def test_convert_diffusers_vae_cli(tmp_path, capsys):
    reference = diffusers_vae(scaling_factor=0.3)
    reference.save_pretrained(tmp_path / "diffusers")
    code, out, _ = run_cli(["convert", "diffusers-vae", "--model", tmp_path / "diffusers", "--out",
                            tmp_path / "mmgen"], capsys)
    assert code == 0 and "scaling factor 0.3" in out
    model = mmgen.load(tmp_path / "mmgen")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = reference.decode(reference.encode(images).latent_dist.mode()).sample
        assert torch.allclose(model(images, sample_posterior=False)[0], expected, atol=1e-4)
    assert model.config.scaling_factor == 0.3
    code, _, err = run_cli(["convert", "diffusers-vae", "--model", tmp_path / "nothing", "--out", tmp_path / "x"],
                           capsys)
    one_line_error(code, err, 1, "diffusers VAE folder not found")
