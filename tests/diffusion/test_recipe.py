"""`mmgen train diffusion` on tiny shapes with a tiny CLIP, `mmgen sample text2img`, and one line per user error."""

import json
import shutil

import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

import mmgen
from mmgen import cli
from mmgen.diffusion import TextToImage
from mmgen.text import GPT, GPTConfig
from tests.clip.helpers import make_clip
from tests.diffusion.helpers import TINY_UNET
from tests.test_cli import one_line_error, run_cli

TINY_DIFFUSION = {
    "model": {"image_size": 16, "unet": {name: list(value) if isinstance(value, tuple) else value
                                         for name, value in TINY_UNET.items()},
              "schedule": {"num_train_timesteps": 50, "beta_schedule": "squaredcos_cap_v2"}},
    "data": {"train": "shapes:train:64", "val": "shapes:val:16", "cache": True},
    "loss": {"caption_dropout": 0.2, "min_snr_gamma": 5.0},
    "samples": {"count": 2, "steps": 2},
    "train": {"batch_size": 8, "max_steps": 4, "lr": 1e-3, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1,
              "log_every": 2, "checkpoint_every": 2, "ema_decay": 0.9, "tensorboard": False, "progress": False},
}
PIXELS = ["model.pixel_shift=-0.5", "model.pixel_scale=2.0"]  # the trained run (and its resumed twin) scales pixels


def write_config(folder, clip_folder):
    config = {name: dict(values) for name, values in TINY_DIFFUSION.items()}
    config["model"]["text_encoder"] = str(clip_folder)
    path = folder / "diffusion.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusion")
    make_clip(0).save_pretrained(folder / "clip")
    config = write_config(folder, folder / "clip")
    assert cli.main(["train", "diffusion", "--config", str(config), "--out", str(folder / "run"), *PIXELS]) == 0
    return folder


def test_training_logs_sample_grids_and_writes_a_text2img_model(trained):
    run = trained / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    grids = [r for r in records if "samples/grid" in r]
    assert [r["step"] for r in grids] == [2, 4] and all("val/loss" in r for r in grids)
    for record in grids:
        grid = Image.open(run / record["samples/grid"])
        assert record["samples/grid"] == f"samples/step-{record['step']}.png" and grid.size == (2 * 18 + 2, 18 + 2)
    assert all(r["train/loss"] > 0 for r in records if "train/loss" in r)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["unet"]["context_dim"] == 64 and saved["model"]["unet"]["pooled_dim"] == 48
    assert (run / "checkpoints" / "step-2" / "ema.safetensors").is_file()
    model = mmgen.load(run)
    assert isinstance(model, TextToImage) and (model.config.pixel_shift, model.config.pixel_scale) == (-0.5, 2.0)


def test_resume_needs_no_clip_folder_and_matches_an_uninterrupted_run(trained, tmp_path):
    shutil.copytree(trained / "clip", tmp_path / "clip")
    config = write_config(tmp_path, tmp_path / "clip")
    interrupted = tmp_path / "interrupted"
    command = ["train", "diffusion", "--config", str(config), "--out", str(interrupted), "samples.count=0", *PIXELS]
    assert cli.main(command) == 0
    shutil.rmtree(interrupted / "final")
    shutil.rmtree(tmp_path / "clip")  # the checkpoint carries the text encoder
    assert cli.main(["train", "diffusion", "--resume", str(interrupted)]) == 0
    whole = load_file(str(trained / "run" / "final" / "model.safetensors"))
    resumed = load_file(str(interrupted / "final" / "model.safetensors"))
    assert whole.keys() == resumed.keys() and all((whole[name] == resumed[name]).all() for name in whole)


def test_sample_cli_writes_a_grid_and_one_png_per_image(trained, tmp_path, capsys):
    command = ["sample", "text2img", "--checkpoint", trained / "run", "--prompt", "a red circle", "--prompt",
               "a small blue square at the top left", "--n", 2, "--steps", 3, "--seed", 5]
    code, out, _ = run_cli(command + ["--out", tmp_path / "a"], capsys)
    assert code == 0 and "wrote 4 images" in out
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000.png", "001.png", "002.png", "003.png", "grid.png", "samples.json"]
    assert Image.open(tmp_path / "a" / "000.png").size == (16, 16)
    assert Image.open(tmp_path / "a" / "grid.png").size == (2 * 18 + 2, 2 * 18 + 2)  # a row per prompt
    record = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert record["images"][2] == {"file": "002.png", "prompt": "a small blue square at the top left"}
    assert run_cli(command + ["--out", tmp_path / "b"], capsys)[0] == 0
    for name in names[:5]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    before = (tmp_path / "a" / "000.png").read_bytes()
    code, _, err = run_cli(command + ["--seed", 6, "--out", tmp_path / "a"], capsys)
    one_line_error(code, err, 1, "already exists and is not empty")
    assert (tmp_path / "a" / "000.png").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_sample_cli_bad_inputs(trained, tmp_path, capsys):
    base = ["sample", "text2img", "--checkpoint", trained / "run", "--steps", 2, "--n", 1, "--out"]
    code, out, err = run_cli(base + [tmp_path / "empty", "--prompt", ""], capsys)
    assert code == 0 and "wrote 1 images" in out
    code, out, _ = run_cli(base + [tmp_path / "limited", "--prompt", "a red circle", "--guidance-rescale", "0.7",
                                   "--guidance-interval", "0", "400"], capsys)
    assert code == 0 and "wrote 1 images" in out
    messages = [line for line in err.splitlines() if line.startswith("mmgen:")]  # the rest is the progress bar
    assert messages == ["mmgen: warning: prompt 1 is empty: its images are sampled unconditionally"]
    cases = [
        (["--prompt", "a red circle", "--guidance", "-1"], 2, "--guidance: must be >= 0"),
        (["--prompt", "a red circle", "--steps", "0"], 2, "--steps: must be a positive integer"),
        (["--prompt", "a red circle", "--steps", "51"], 1, "steps must lie between 1 and the model's 50"),
        (["--prompt", "a red circle", "--sampler", "euler"], 2, "invalid choice: 'euler'"),
        (["--prompt", "a red circle", "--clip-model", trained / "run"], 1, "holds a 'text2img' model, not a 'clip'"),
        (["--prompt", "a red circle", "--guidance-rescale", "1.5"], 2, "--guidance-rescale: must lie in [0, 1]"),
        (["--prompt", "a red circle", "--guidance-interval", "30", "10"], 1, "needs T_LOW <= T_HIGH"),
        (["--prompt", "a red circle", "--guidance-interval", "-1", "10"], 2, "--guidance-interval: must be >= 0"),
    ]
    for arguments, exit_code, fragment in cases:
        code, _, err = run_cli(base + [tmp_path / "x", *arguments], capsys)
        one_line_error(code, err, exit_code, fragment)
    GPT(GPTConfig(vocab_size=11, context_length=8, num_layers=1, num_heads=2, dim=16)).save_pretrained(tmp_path / "lm")
    for folder, model_type in ((trained / "clip", "clip"), (tmp_path / "lm", "gpt")):
        code, _, err = run_cli(["sample", "text2img", "--checkpoint", folder, "--prompt", "a red circle", "--out",
                                tmp_path / "x"], capsys)
        one_line_error(code, err, 1, f"holds a '{model_type}' model, not a 'text2img' one")
    assert not (tmp_path / "x").exists()


def test_train_refuses_a_text_encoder_that_is_not_a_clip(trained, tmp_path, capsys):
    GPT(GPTConfig(vocab_size=11, context_length=8, num_layers=1, num_heads=2, dim=16)).save_pretrained(tmp_path / "lm")
    config = write_config(tmp_path, tmp_path / "lm")
    cases = [
        ([], "holds a 'gpt' model, not a 'clip' one"),
        ([f"model.text_encoder={tmp_path / 'nowhere'}"], "checkpoint not found"),
        ([f"model.text_encoder={trained / 'clip'}", "model.unet.context_dim=32"], "model.unet.context_dim is set by"),
        ([f"model.text_encoder={trained / 'clip'}", "samples.steps=80"], "samples.steps (80) exceeds the 50"),
        ([f"model.text_encoder={trained / 'clip'}", "loss.caption_dropout=2"], "caption_dropout must lie in [0, 1]"),
        ([f"model.text_encoder={trained / 'clip'}", "model.pixel_scale=0"], "pixel_scale a positive one, got 0.0 and"),
    ]
    for overrides, fragment in cases:
        code, _, err = run_cli(["train", "diffusion", "--config", config, "--out", tmp_path / "run", *overrides], capsys)
        one_line_error(code, err, 2, fragment)
        assert not (tmp_path / "run").exists()


def test_two_samplers_into_one_new_folder_the_second_is_refused(trained, tmp_path, capsys):
    from tests.locks import lock_held_elsewhere

    out = tmp_path / "shared"
    command = ["sample", "text2img", "--checkpoint", trained / "run", "--prompt", "a red circle", "--steps", 2, "--n",
               1, "--out", out]
    with lock_held_elsewhere(out):  # a first `mmgen sample` still sampling into the new folder
        code, _, err = run_cli(command, capsys)
    one_line_error(code, err, 1, "in use by another mmgen process")
    code, out_text, _ = run_cli(command, capsys)
    assert code == 0 and (out / "grid.png").is_file()
    code, _, err = run_cli(command, capsys)  # the first one's files are never replaced
    one_line_error(code, err, 1, "already exists and is not empty")
