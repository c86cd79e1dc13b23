"""Latent diffusion: `mmgen train latent-diffusion` on a tiny frozen VAE, sampling through the pipeline and the CLI
(encode -> diffuse -> decode hidden), save/load, and one clear line for each bad model.vae."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import mmgen
from mmgen import cli
from mmgen.config import from_dict, load_yaml, to_dict
from mmgen.diffusion import NoiseSchedule, TextToImage, UNetConfig
from mmgen.diffusion.vae import VAE, VAEConfig
from mmgen.pipelines import TextToImagePipeline
from mmgen.recipes.latent_diffusion import LatentDiffusionRecipe
from tests.clip.helpers import make_clip
from tests.diffusion.helpers import TINY_UNET
from tests.diffusion.test_recipe import TINY_DIFFUSION
from tests.finetune.helpers import FAST_TRAIN, write_yaml
from tests.test_cli import one_line_error, run_cli

TINY_VAE = VAEConfig(base_channels=8, channel_multipliers=(1, 2), blocks_per_level=1, groups=4, latent_channels=4,
                     scaling_factor=0.5)  # 16x16 images <-> 4x8x8 latents
LATENT_UNET = {**{name: list(value) if isinstance(value, tuple) else value for name, value in TINY_UNET.items()},
               "in_channels": 4, "out_channels": 4}


def write_config(folder, clip_folder, vae_folder, **model):
    config = {name: dict(values) for name, values in TINY_DIFFUSION.items()}
    config["model"] = {**config["model"], "text_encoder": str(clip_folder), "vae": str(vae_folder),
                       "unet": dict(LATENT_UNET), **model}
    path = folder / "ldm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_vae(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(TINY_VAE).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ldm")
    make_clip(0).save_pretrained(folder / "clip")
    tiny_vae().save_pretrained(folder / "vae")
    config = write_config(folder, folder / "clip", folder / "vae")
    assert cli.main(["train", "latent-diffusion", "--config", str(config), "--out", str(folder / "run")]) == 0
    return folder


def test_training_writes_a_text2img_model_with_the_frozen_vae(trained):
    run = trained / "run"
    model = mmgen.load(run)
    assert isinstance(model, TextToImage) and model.config.sample_shape == (4, 8, 8)
    assert model.config.image_size == 16 and model.config.vae == TINY_VAE
    source = VAE.from_pretrained(trained / "vae").state_dict()
    assert all(torch.equal(tensor, source[name]) for name, tensor in model.vae.state_dict().items())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    grids = [r for r in records if "samples/grid" in r]
    assert [r["step"] for r in grids] == [2, 4] and all("val/loss" in r for r in grids)
    assert Image.open(run / grids[-1]["samples/grid"]).size == (2 * 18 + 2, 18 + 2)  # decoded 16 px images
    assert all(r["train/loss"] > 0 for r in records if "train/loss" in r)


def test_pipeline_and_sample_cli_return_images_at_the_vae_resolution(trained, tmp_path, capsys):
    pipeline = TextToImagePipeline.from_pretrained(trained / "run")
    images = pipeline(["a red circle", "a blue square"], steps=2, progress=False)
    assert [image.size for image in images] == [(16, 16), (16, 16)]
    guided = pipeline(["a red circle", "a blue square"], steps=2, clip_guidance_scale=50.0, progress=False)
    assert [image.size for image in guided] == [(16, 16), (16, 16)]  # CLIP's gradient goes through the decoder
    assert not np.array_equal(np.asarray(guided[0]), np.asarray(images[0]))
    code, out, _ = run_cli(["sample", "text2img", "--checkpoint", trained / "run", "--prompt", "a red circle",
                            "--n", 2, "--steps", 2, "--out", tmp_path / "samples"], capsys)
    assert code == 0 and "wrote 2 images" in out
    assert Image.open(tmp_path / "samples" / "000.png").size == (16, 16)


def test_latent_samples_stay_within_the_sample_range(trained):
    # from pure noise, x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) with alpha_bar_T ~ 0: unclipped, a
    # rough noise prediction makes the latents explode (std ~1e3 with a trained model); the pipeline clips at +-4
    model = mmgen.load(trained / "run")
    with torch.no_grad():
        model.unet.conv_out.weight.normal_(std=0.5)  # a rough, non-zero noise prediction
    decoded = []
    decode = model.decode_samples
    model.decode_samples = lambda samples: decoded.append(samples) or decode(samples)
    TextToImagePipeline(model)(["a red circle"] * 2, steps=10, progress=False)
    assert decoded[0].abs().max() <= model.sample_range == 4.0


def test_save_load_round_trip_samples_the_same(trained, tmp_path):
    model = mmgen.load(trained / "run")
    model.save_pretrained(tmp_path / "copy")
    loaded = mmgen.load(tmp_path / "copy")
    assert to_dict(loaded.config) == to_dict(model.config)
    state = model.state_dict()
    assert all(torch.equal(tensor, state[name]) for name, tensor in loaded.state_dict().items())
    first, second = (TextToImagePipeline(m)("a red circle", steps=2, progress=False)[0] for m in (model, loaded))
    assert np.array_equal(np.asarray(first), np.asarray(second))


def test_encode_images_gives_scaled_latents_and_decode_samples_inverts_the_scaling():
    clip, vae = make_clip(0), tiny_vae()
    model = TextToImage.from_text_encoder(clip, 16, UNetConfig(**{**TINY_UNET, "in_channels": 4, "out_channels": 4}),
                                          NoiseSchedule(num_train_timesteps=10), vae)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = model.encode_images(images, torch.Generator().manual_seed(1))
    posterior = vae.encode(images)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(latents, 0.5 * (posterior.mean + posterior.std * noise), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(model.decode_samples(latents), vae.decode(latents / 0.5), atol=1e-6)
    assert model.sample_range == 4.0 and model.encode_images(images) is not images
    pixel = TextToImage.from_text_encoder(clip, 16, UNetConfig(**TINY_UNET), NoiseSchedule(num_train_timesteps=10))
    assert pixel.sample_range == 1.0 and pixel.encode_images(images) is images and pixel.decode_samples(images) is images


def test_resume_needs_neither_the_clip_nor_the_vae_folder(trained, tmp_path):
    for name in ("clip", "vae"):
        shutil.copytree(trained / name, tmp_path / name)
    config = write_config(tmp_path, tmp_path / "clip", tmp_path / "vae")
    run = tmp_path / "run"
    assert cli.main(["train", "latent-diffusion", "--config", str(config), "--out", str(run), "samples.count=0",
                     "train.max_steps=2", "train.checkpoint_every=1"]) == 0
    shutil.rmtree(run / "final")
    shutil.rmtree(tmp_path / "clip")
    shutil.rmtree(tmp_path / "vae")
    assert cli.main(["train", "latent-diffusion", "--resume", str(run)]) == 0
    assert mmgen.load(run).config.vae == TINY_VAE


def test_lora_finetuning_of_a_latent_model_trains_on_latents(trained, tmp_path):
    config = {"method": "lora", "lora": {"rank": 2, "targets": ["attn"]},
              "data": {"train": "shapes:train:16", "val": None, "cache": True},
              "samples": {"prompts": ["a red circle"], "count": 1, "steps": 2}, "train": dict(FAST_TRAIN, max_steps=2)}
    run = tmp_path / "run"
    assert cli.main(["finetune", "diffusion", "--base", str(trained / "run"), "--config",
                     str(write_yaml(tmp_path / "finetune.yaml", config)), "--out", str(run)]) == 0
    assert Image.open(run / "samples" / "step-2.png").size == (18 + 2, 18 + 2)  # one decoded 16 px image


def test_bad_vae_folders_and_shapes_give_one_line(trained, tmp_path, capsys):
    clip, vae = trained / "clip", trained / "vae"
    cases = [
        ({"vae": str(clip)}, 2, f"model.vae={clip}: {clip} holds a 'clip' model, not a 'vae' one"),
        ({"vae": str(tmp_path / "missing")}, 2, "checkpoint not found"),
        ({"vae": None}, 2, "'model.vae' expects str"),
        ({"unet": {**LATENT_UNET, "in_channels": 3, "out_channels": 3}}, 2, "must be the 4 latent channels of the VAE"),
        ({"image_size": 14}, 2, "image_size must be a positive multiple of 4 (the VAE's downsampling times the"),
    ]
    for model, code, fragment in cases:
        config = write_config(tmp_path, clip, vae, **model)
        result = run_cli(["train", "latent-diffusion", "--config", config, "--out", tmp_path / "run"], capsys)
        one_line_error(result[0], result[2], code, fragment)
        assert not (tmp_path / "run").exists()


def test_latent_channels_mismatch_is_refused_by_the_model_config():
    with pytest.raises(ValueError, match=r"unet.in_channels \(3\) must equal the VAE's latent_channels \(4\)"):
        TextToImage.from_text_encoder(make_clip(0), 16, UNetConfig(**TINY_UNET), NoiseSchedule(), tiny_vae())


def test_shipped_config_is_valid():
    configs = mmgen.__path__[0] + "/../configs/"
    recipe = from_dict(LatentDiffusionRecipe, load_yaml(configs + "ldm-shapes.yaml"))
    vae = load_yaml(configs + "vae-shapes.yaml")["model"]
    assert recipe.model.unet.in_channels == vae["latent_channels"] and recipe.model.image_size == vae["image_size"]
