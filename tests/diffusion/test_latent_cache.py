"""The latent cache of latent diffusion (mmgen.diffusion.latent_cache): cached posterior moments and text states give
the very loss the images and captions give, a second run reuses the folder and reads no pixels, and a cache written
for other data or encoders is refused in one line; `mmgen finetune diffusion` (LoRA) trains on it the adapter the
images train."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mmgen.data.robust import collate_captions
from mmgen.data.shapes import ShapesDataset
from mmgen.diffusion import NoiseSchedule, TextToImage, UNetConfig
from mmgen.diffusion.latent_cache import LatentCache, encode_dataset
from mmgen.diffusion.objective import CachedLatentLoss, DenoisingLoss, DiffusionLossConfig
from mmgen.diffusion.text2img import tokenize_prompts
from tests.clip.helpers import make_clip
from tests.diffusion.helpers import tiny_text2img
from tests.diffusion.test_latent import LATENT_UNET, tiny_vae, write_config
from tests.finetune.helpers import FAST_TRAIN, write_yaml
from tests.test_cli import one_line_error, run_cli


def tiny_latent_model() -> TextToImage:
    unet = UNetConfig(**{name: tuple(value) if isinstance(value, list) else value
                         for name, value in LATENT_UNET.items()})
    torch.manual_seed(0)
    return TextToImage.from_text_encoder(make_clip(0), 16, unet, NoiseSchedule(num_train_timesteps=50),
                                         tiny_vae()).train()


def test_cached_batches_give_the_loss_of_images_and_captions():
    model = tiny_latent_model()
    items = [ShapesDataset("train", 8, image_size=16, normalize="minus_one_to_one")[index] for index in range(8)]
    batch = collate_captions(items)
    batch["tokens"] = tokenize_prompts(batch["captions"], model.context_length)
    cached = LatentCache(encode_dataset(model, items, batch_size=3, progress=False))
    cached_batch = {name: torch.stack([cached[i][name] for i in range(8)]) for name in cached[0]}
    config = DiffusionLossConfig(caption_dropout=0.5, min_snr_gamma=5.0)
    losses = []
    for loss_fn, inputs in ((DenoisingLoss(model, config), batch), (CachedLatentLoss(model, config), cached_batch)):
        torch.manual_seed(3)
        losses.append(loss_fn(model, inputs)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.manual_seed(4)  # control: another draw gives another loss, so the match above is not vacuous
    assert abs(CachedLatentLoss(model, config)(model, cached_batch)[0] - losses[0]) > 1e-4


@pytest.fixture
def folders(tmp_path):
    make_clip(0).save_pretrained(tmp_path / "clip")
    tiny_vae().save_pretrained(tmp_path / "vae")
    return tmp_path


def train(folders, out, *extra):
    config = write_config(folders, folders / "clip", folders / "vae")
    return ["train", "latent-diffusion", "--config", config, "--out", folders / out,
            f"data.latent_cache={folders / 'cache'}", "data.cache=false", "samples.prompts=[a red circle]",
            "train.max_steps=2", *extra]


def test_a_second_run_reuses_the_cache_and_reads_no_pixels(folders, monkeypatch, capsys):
    assert run_cli(train(folders, "first"), capsys)[0] == 0
    manifest = json.loads((folders / "cache" / "train" / "manifest.json").read_text())
    assert manifest["items"] == manifest["cached"] == 64 and (folders / "cache" / "val" / "manifest.json").is_file()

    def no_pixels(self, index):
        raise AssertionError("an image was read")

    monkeypatch.setattr(ShapesDataset, "__getitem__", no_pixels)
    code, _, err = run_cli(train(folders, "second"), capsys)
    assert code == 0, err
    metrics = [json.loads(line) for line in (folders / "second" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in record for record in metrics)
    built, reused = (load_file(str(folders / name / "final" / "model.safetensors")) for name in ("first", "second"))
    for name in built:  # building the cache draws nothing from the run's RNG: both runs train the same weights
        torch.testing.assert_close(reused[name], built[name], rtol=1e-5, atol=1e-7)


def test_a_cache_of_other_encoders_or_settings_is_refused_in_one_line(folders, capsys):
    assert run_cli(train(folders, "first"), capsys)[0] == 0
    tiny_vae(seed=1).save_pretrained(folders / "vae2")
    config = write_config(folders, folders / "clip", folders / "vae2")
    args = ["train", "latent-diffusion", "--config", config, "--out", folders / "other",
            f"data.latent_cache={folders / 'cache'}", "samples.count=0"]
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, 1, "differs in: vae")
    code, _, err = run_cli(train(folders, "crop", "data.crop_scale=[0.8, 1.0]"), capsys)
    one_line_error(code, err, 2, "random crops")
    assert not (folders / "other").exists() and not (folders / "crop").exists()


def finetune(folders, out, *extra, cache: bool = True):
    config = {"method": "lora", "lora": {"rank": 2, "targets": ["attn", "conv"]},
              "data": {"train": "shapes:train:16", "val": "shapes:val:8", "cache": False},
              "samples": {"prompts": ["a red circle"], "count": 1, "steps": 2},
              "train": dict(FAST_TRAIN, max_steps=2, eval_batches=1)}
    if cache:
        config["data"]["latent_cache"] = str(folders / "ft-cache")
    return ["finetune", "diffusion", "--base", folders / "base", "--config",
            write_yaml(folders / f"{out}.yaml", config), "--out", folders / out, *extra]


@pytest.fixture
def latent_base(folders):
    tiny_latent_model().save_pretrained(folders / "base")
    return folders


def test_lora_finetuning_on_the_cache_trains_the_adapter_the_images_train(latent_base, monkeypatch, capsys):
    folders = latent_base
    for name, cache in (("pixels", False), ("cached", True)):
        code, _, err = run_cli(finetune(folders, name, cache=cache), capsys)
        assert code == 0, err
    manifest = json.loads((folders / "ft-cache" / "train" / "manifest.json").read_text())
    assert manifest["items"] == manifest["cached"] == 16
    adapters = [load_file(str(folders / name / "final" / "adapter.safetensors")) for name in ("pixels", "cached")]
    assert adapters[0].keys() == adapters[1].keys() and all(name.startswith("unet.") for name in adapters[0])
    assert any(tensor.abs().max() > 0 for tensor in adapters[0].values())  # the adapter moved off its zero init
    for name in adapters[0]:  # same data, seed and draws: the cached run trains the very same adapter
        torch.testing.assert_close(adapters[1][name], adapters[0][name], rtol=1e-4, atol=1e-6)

    def no_pixels(self, index):
        raise AssertionError("an image was read")

    monkeypatch.setattr(ShapesDataset, "__getitem__", no_pixels)
    code, _, err = run_cli(finetune(folders, "again", "samples.count=0"), capsys)
    assert code == 0, err
    metrics = [json.loads(line) for line in (folders / "again" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in record for record in metrics)


def test_finetuning_with_a_cache_refuses_pixel_bases_dpo_and_crops_in_one_line(latent_base, capsys):
    folders = latent_base
    tiny_text2img().save_pretrained(folders / "pixel-base")
    cases = [(["--base", folders / "pixel-base"], "a pixel model has no latents"),
             (["objective=dpo"], "objective dpo renders its own pairs"),
             (["data.crop_scale=[0.8, 1.0]"], "random crops")]
    for extra, fragment in cases:
        args = finetune(folders, "refused")
        if extra[0] == "--base":
            args[args.index("--base") + 1] = extra[1]
        else:
            args += extra
        code, _, err = run_cli(args, capsys)
        one_line_error(code, err, 2, fragment)
        assert not (folders / "refused").exists()
