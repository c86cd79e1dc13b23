"""The recipes `mmgen train NAME` and `mmgen finetune NAME` run: one table, read by the CLI to build its parsers.

The table lives here, not in the recipe modules, because importing a recipe imports torch and `mmgen --help` must
stay fast; each entry names its module in mmgen/recipes/, and tests/test_commands.py checks that module's train().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_LM_HINT = "mmgen sample lm --checkpoint {run}"
# {eval_data} and {prompt} come from the run's own config.yaml (mmgen.hints.finished_hint), so that a run on a user's
# CSV suggests its own held-out data, not shapes
_CLIP_HINT = "mmgen eval clip --checkpoint {run}{eval_data}"
_TEXT2IMG_HINT = "mmgen sample text2img --checkpoint {run} --prompt {prompt} --out samples"


@dataclass(frozen=True)
class RecipeCommand:
    """One `mmgen GROUP NAME`: the recipe module (in mmgen.recipes) whose train() it calls, its help line, and the
    command a finished run suggests next ({run}: the run folder, or for an adapter "BASE --adapter RUN_DIR";
    {eval_data} and {prompt}: from the run's data, see mmgen.hints).

    A train recipe has train(config, run_dir, overrides, resume); a finetune recipe also takes base."""

    group: Literal["train", "finetune"]
    name: str
    module: str
    help: str
    hint: str


RECIPES: tuple[RecipeCommand, ...] = (
    RecipeCommand("train", "lm", "lm", "GPT language model (configs/lm-*.yaml)", _LM_HINT),
    RecipeCommand("train", "mlm", "mlm", "BERT-style masked language model (configs/mlm-*.yaml)",
                  'mmgen sample mlm --checkpoint {run} --text "To be, or not to [MASK]"'),
    RecipeCommand("train", "clip", "clip", "CLIP on image-caption pairs (configs/clip-*.yaml)", _CLIP_HINT),
    RecipeCommand("train", "diffusion", "diffusion",
                  "GLIDE-style text-to-image diffusion on a trained CLIP (configs/diffusion-*.yaml)", _TEXT2IMG_HINT),
    RecipeCommand("train", "vae", "vae",
                  "KL autoencoder for latent diffusion; measures the latent scaling factor (configs/vae-*.yaml)",
                  "mmgen train latent-diffusion --config configs/ldm-shapes.yaml --out runs/ldm-shapes "
                  "model.vae={run}"),
    RecipeCommand("train", "latent-diffusion", "latent_diffusion",
                  "text-to-image diffusion on a trained VAE's latents (configs/ldm-*.yaml)", _TEXT2IMG_HINT),
    RecipeCommand("train", "prior", "prior",
                  "unCLIP prior: CLIP text -> CLIP image embedding, on a trained CLIP (configs/prior-*.yaml)",
                  "mmgen sample text2img --checkpoint {run} --decoder DECODER_RUN --prompt {prompt} --out samples"),
    RecipeCommand("train", "decoder", "decoder",
                  "unCLIP decoder: CLIP image embedding -> image, on a trained CLIP (configs/decoder-*.yaml)",
                  "mmgen sample variations --checkpoint {run} IMAGE.png --out variations"),
    RecipeCommand("finetune", "lm", "finetune_lm",
                  "adapt a GPT to a text or to instruction/response pairs (configs/finetune-lm-*.yaml)", _LM_HINT),
    RecipeCommand("finetune", "clip", "finetune_clip",
                  "adapt a CLIP to new image-caption data (configs/finetune-clip-*.yaml)", _CLIP_HINT),
    RecipeCommand("finetune", "diffusion", "finetune_diffusion",
                  "adapt a text-to-image model's UNet (configs/finetune-diffusion-*.yaml)", _TEXT2IMG_HINT),
    RecipeCommand("finetune", "clip-classifier", "finetune_classifier",
                  "CLIP image tower + a classification head on a labelled image folder (linear probe or fine-tuning)",
                  "python -c \"import mmgen; print(mmgen.load('{run}'))\""),
    RecipeCommand("finetune", "text-classifier", "finetune_text_classifier",
                  "GPT or masked LM + a classification head on a CSV/JSONL table of text,label (full or LoRA)",
                  "python -c \"import mmgen; print(mmgen.load('{run}'))\""),
)


def recipes(group: str) -> tuple[RecipeCommand, ...]:
    """The recipes of `mmgen train` or `mmgen finetune`, in --help order."""
    return tuple(recipe for recipe in RECIPES if recipe.group == group)


def find_recipe(group: str, name: str) -> RecipeCommand:
    """The recipe `mmgen GROUP NAME` runs (the parser has already refused unknown names)."""
    return next(recipe for recipe in RECIPES if recipe.group == group and recipe.name == name)
