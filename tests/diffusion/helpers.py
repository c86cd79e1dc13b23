"""Helpers for the text-to-image tests: a tiny CLIP text encoder and a tiny TextToImage with every branch live."""

import json
from pathlib import Path
from typing import Callable

import torch

from mmgen.diffusion import NoiseSchedule, TextToImage, UNetConfig
from tests.clip.helpers import make_clip

TINY_UNET = dict(base_channels=8, channel_multipliers=(1, 2), attention_levels=(False, True), blocks_per_level=1,
                 num_heads=2, groups=4)


def tiny_text2img(seed: int = 0, image_size: int = 8, prediction_type: str = "epsilon") -> TextToImage:
    """A TextToImage on a tiny perturbed CLIP whose zero-initialised UNet layers are randomised, in eval mode."""
    clip = make_clip(seed)
    torch.manual_seed(seed)
    model = TextToImage.from_text_encoder(clip, image_size, UNetConfig(**TINY_UNET),
                                          NoiseSchedule(num_train_timesteps=100, prediction_type=prediction_type))
    with torch.no_grad():
        for parameter in model.unet.parameters():
            if not parameter.any():
                parameter.normal_(std=0.2)
    return model.eval()


def older_folder(model_folder: Path, folder: Path, missing: tuple[str, ...]) -> Callable[..., None]:
    """A writer of `folder`: `model_folder`'s weights (linked) and its config.json without the keys `missing` (a
    folder written before they existed), updated with the writer's keyword arguments."""
    meta = json.loads((model_folder / "config.json").read_text())
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(model_folder / "model.safetensors")

    def write_config(**changes) -> None:
        config = {key: value for key, value in meta["config"].items() if key not in missing}
        (folder / "config.json").write_text(json.dumps({**meta, "config": {**config, **changes}}))

    return write_config
