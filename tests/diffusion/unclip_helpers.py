"""Helpers for the unCLIP tests: tiny priors and decoders, tiny prior / decoder recipes, and runs trained on them."""

import torch
import yaml

from mmgen import cli
from mmgen.diffusion import DiffusionPrior, NoiseSchedule, PriorTransformerConfig, UnCLIPDecoder, UNetConfig
from tests.clip.helpers import make_clip
from tests.diffusion.helpers import TINY_UNET

TINY_TRANSFORMER = dict(width=32, layers=2, heads=2)


def tiny_prior(seed: int = 0, prediction_type: str = "sample", **clip_changes) -> DiffusionPrior:
    """A prior with a small random transformer on a tiny perturbed CLIP, in eval mode."""
    clip = make_clip(seed, **clip_changes)
    torch.manual_seed(seed)
    schedule = NoiseSchedule(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                             prediction_type=prediction_type)
    return DiffusionPrior.from_clip(clip, PriorTransformerConfig(**TINY_TRANSFORMER), schedule).eval()


def tiny_decoder(seed: int = 0, image_size: int = 8, text_conditioning: bool = True, **clip_changes) -> UnCLIPDecoder:
    """A decoder on a tiny perturbed CLIP whose zero-initialised UNet layers are randomised, in eval mode."""
    clip = make_clip(seed, **clip_changes)
    torch.manual_seed(seed)
    model = UnCLIPDecoder.from_clip(clip, image_size, UNetConfig(**TINY_UNET), NoiseSchedule(num_train_timesteps=100),
                                    text_conditioning=text_conditioning)
    with torch.no_grad():
        for parameter in model.unet.parameters():
            if not parameter.any():
                parameter.normal_(std=0.2)
    return model.eval()


_TRAIN = {"batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1, "log_every": 2,
          "ema_decay": 0.9, "tensorboard": False, "progress": False}
TINY_PRIOR_RECIPE = {
    "model": {"transformer": TINY_TRANSFORMER,
              "schedule": {"num_train_timesteps": 50, "beta_schedule": "squaredcos_cap_v2",
                           "prediction_type": "sample"}},
    "data": {"train": "shapes:train:64", "val": "shapes:val:16", "cache": True},
    "loss": {"caption_dropout": 0.2},
    "samples": {"count": 8, "steps": 3},
    "train": {**_TRAIN, "max_steps": 4, "checkpoint_every": 2},
}
TINY_DECODER_RECIPE = {
    "model": {"image_size": 16, "unet": {name: list(value) if isinstance(value, tuple) else value
                                         for name, value in TINY_UNET.items()},
              "schedule": {"num_train_timesteps": 50, "beta_schedule": "squaredcos_cap_v2"}},
    "data": {"train": "shapes:train:64", "val": "shapes:val:16", "cache": True},
    "loss": {"caption_dropout": 0.5, "image_embedding_dropout": 0.2},
    "samples": {"count": 2, "steps": 2},
    "train": {**_TRAIN, "max_steps": 2, "checkpoint_every": 0},
}


def write_config(folder, recipe: dict, clip_folder, name: str):
    """folder/NAME.yaml: `recipe` with model.clip = clip_folder."""
    config = {section: dict(values) for section, values in recipe.items()}
    config["model"]["clip"] = str(clip_folder)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_decoder_run(folder, *overrides: str):
    """folder/clip (make_clip(0)) and folder/run: TINY_DECODER_RECIPE trained on it with `overrides`."""
    make_clip(0).save_pretrained(folder / "clip")
    config = write_config(folder, TINY_DECODER_RECIPE, folder / "clip", "decoder")
    assert cli.main(["train", "decoder", "--config", str(config), "--out", str(folder / "run"), *overrides]) == 0
    return folder


def train_unclip_runs(folder):
    """folder/clip (make_clip(0)), and folder/prior (4 steps) and folder/decoder (2 steps) trained on it."""
    make_clip(0).save_pretrained(folder / "clip")
    for name, recipe in (("prior", TINY_PRIOR_RECIPE), ("decoder", TINY_DECODER_RECIPE)):
        config = write_config(folder, recipe, folder / "clip", name)
        assert cli.main(["train", name, "--config", str(config), "--out", str(folder / name)]) == 0
    return folder
