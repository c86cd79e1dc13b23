"""`mmgen quickstart` end to end with tiny overrides: both runs, the held-out zero-shot line, grids, the summary."""

import json

from PIL import Image

import mmgen
from mmgen.clip import CLIP
from mmgen.data.shapes import heldout_pairs
from mmgen.diffusion import TextToImage
from mmgen.recipes.quickstart import heldout_prompts
from tests.test_cli import one_line_error, run_cli

TINY = {
    "clip": ["model.embed_dim=32", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.layers=1",
             "model.vision.heads=2", "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
             "data.train=shapes:train:64", "data.val=shapes:val:16", "data.eval_samples=32", "train.batch_size=16",
             "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.tensorboard=false"],
    "diffusion": ["model.unet.base_channels=8", "model.unet.groups=4", "model.unet.num_heads=2",
                  "model.schedule.num_train_timesteps=50", "data.train=shapes:train:32", "data.val=shapes:val:8",
                  "samples.count=2", "samples.steps=2", "train.batch_size=8", "train.max_steps=2",
                  "train.eval_every=2", "train.checkpoint_every=2", "train.tensorboard=false"],
}


def test_quickstart_trains_both_models_and_samples_heldout_prompts(tmp_path, capsys):
    out = tmp_path / "quick"
    command = ["quickstart", "--out", out, "--prompts", 3, "--n", 2]
    for recipe, overrides in TINY.items():
        for override in overrides:
            command += [f"--{recipe}", override]
    code, printed, _ = run_cli(command, capsys)
    assert code == 0
    assert "zero-shot top-1" in printed and "quickstart done" in printed and str(out / "samples" / "grid.png") in printed
    assert isinstance(mmgen.load(out / "clip"), CLIP) and isinstance(mmgen.load(out / "diffusion"), TextToImage)
    samples = json.loads((out / "samples" / "samples.json").read_text())
    prompts = [item["prompt"] for item in samples["images"]]
    assert prompts == [prompt for prompt in heldout_prompts(3) for _ in range(2)]
    assert Image.open(out / "samples" / "grid.png").size[0] > Image.open(out / "samples" / "000.png").size[0]
    diffusion_config = (out / "diffusion" / "config.yaml").read_text()
    assert str(out / "clip") in diffusion_config  # the diffusion model is conditioned on the CLIP just trained


def test_heldout_prompts_cover_distinct_heldout_pairs():
    prompts = heldout_prompts(8)
    pairs = {(shape, colour) for shape, colour in heldout_pairs()}
    named = [next(pair for pair in pairs if f"{pair[1]} {pair[0]}" in prompt) for prompt in prompts]
    assert len(set(named)) == 8


def test_quickstart_refuses_a_folder_that_holds_files(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, error = run_cli(["quickstart", "--out", tmp_path], capsys)
    one_line_error(code, error, 1, "not empty")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_quickstart_bad_override_is_one_line(tmp_path, capsys):
    code, _, error = run_cli(["quickstart", "--out", tmp_path / "q", "--clip", "train.no_such_key=1"], capsys)
    one_line_error(code, error, 2, "no_such_key")
    assert not (tmp_path / "q").exists()  # refused before anything was trained or written
