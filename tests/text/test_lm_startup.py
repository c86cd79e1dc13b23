"""`mmgen train lm` start-up: the text path imports no image or model-zoo libraries (each costs seconds on a CPU)."""

import subprocess
import sys

HEAVY = ("torchvision", "open_clip", "diffusers", "transformers", "peft")


def test_lm_recipe_and_trainer_import_no_image_libraries():
    code = ("import sys, mmgen.cli, mmgen.recipes.lm, mmgen.training.trainer, mmgen.data.text; "
            f"print(' '.join(name for name in {HEAVY!r} if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
