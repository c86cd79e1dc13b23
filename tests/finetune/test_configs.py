"""The shipped fine-tuning configs validate, name their bases, and fit random models of their bases' shapes."""

from pathlib import Path

import pytest

from mmgen.clip import CLIP, CLIPConfig
from mmgen.config import from_dict, load_yaml
from mmgen.data.captions import build_caption_dataset
from mmgen.diffusion import NoiseSchedule, TextToImage, UNetConfig
from mmgen.finetune import add_lora, trainable_fraction
from mmgen.recipes.finetune_clip import CLIPFinetuneRecipe
from mmgen.recipes.finetune_diffusion import DiffusionFinetuneRecipe
from mmgen.recipes.finetune_lm import LMFinetuneRecipe
from mmgen.text import GPT, GPTConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def random_base(kind: str):
    """A random model shaped like the base recipe's (configs/*.yaml) model."""
    clip_section = load_yaml(CONFIGS / "clip-shapes.yaml")["model"]
    if kind == "lm":
        return GPT(from_dict(GPTConfig, {**load_yaml(CONFIGS / "lm-shakespeare-char.yaml")["model"], "vocab_size": 65}))
    clip = CLIP(from_dict(CLIPConfig, clip_section))
    if kind == "clip":
        return clip
    section = load_yaml(CONFIGS / "diffusion-shapes.yaml")["model"]
    return TextToImage.from_text_encoder(clip, section["image_size"], from_dict(UNetConfig, section["unet"]),
                                         from_dict(NoiseSchedule, section["schedule"]))


@pytest.mark.parametrize("name, schema, kind, base, most", [
    ("finetune-lm-shakespeare-lora.yaml", LMFinetuneRecipe, "lm", "runs/shakespeare-char", 0.1),
    ("finetune-clip-shapes-lora.yaml", CLIPFinetuneRecipe, "clip", "runs/clip-shapes", 0.05),
    ("finetune-diffusion-shapes-lora.yaml", DiffusionFinetuneRecipe, "diffusion", "runs/diffusion-shapes", 0.2),
])
def test_shipped_configs(name, schema, kind, base, most):
    recipe = from_dict(schema, load_yaml(CONFIGS / name))
    assert recipe.base == base and recipe.method == "lora" and recipe.train.max_steps <= 1200
    model = add_lora(random_base(kind), recipe.lora)
    assert 0 < trainable_fraction(model) <= most  # the aim for CLIP: at most 5% trainable
    if kind != "lm":
        assert "heart" in build_caption_dataset(recipe.data.train).shapes
