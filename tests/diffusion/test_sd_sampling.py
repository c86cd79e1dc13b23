"""Sampling as Stable Diffusion users do it: negative prompts, height and width, DPM-Solver++, half-precision weights
and bfloat16 sampling, through TextToImagePipeline and `mmgen sample text2img`."""

import json

import numpy as np
import pytest
import torch

import mmgen
from mmgen.data.images import to_pil_images
from mmgen.diffusion import (
    Conditioned,
    NoiseSchedule,
    SamplerConfig,
    TextToImage,
    UNetConfig,
    classifier_free_guidance,
    sample_loop,
    tokenize_prompts,
)
from mmgen.errors import UserError
from mmgen.pipelines import TextToImagePipeline
from tests.clip.helpers import make_clip
from tests.diffusion.helpers import TINY_UNET
from tests.diffusion.test_latent import tiny_vae
from tests.test_cli import one_line_error, run_cli

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FAST = dict(steps=4, progress=False)


@pytest.fixture(scope="module")
def latent_model():
    """A tiny latent text-to-image model (16x16 images, 4x8x8 latents) with every UNet layer randomised."""
    unet = UNetConfig(**{**TINY_UNET, "in_channels": 4, "out_channels": 4})
    model = TextToImage.from_text_encoder(make_clip(0), 16, unet, NoiseSchedule(num_train_timesteps=100, **SD_BETAS),
                                          vae=tiny_vae())
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.unet.parameters():
            if not parameter.any():
                parameter.normal_(std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def folder(latent_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ldm") / "model"
    latent_model.save_pretrained(path)
    return path


def pixels(images):
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_negative_prompt_is_cfg_against_that_prompts_condition(latent_model):
    pipeline = TextToImagePipeline(latent_model)
    prompts, negatives = ["a red circle", "a blue star"], ["a green square", "a yellow heart"]
    images = pipeline(prompts, negative_prompt=negatives, guidance_scale=4.0, sampler="dpm++", seed=3, **FAST)
    # by hand: classifier-free guidance whose unconditional branch is conditioned on the negative prompts
    model = latent_model
    encode = lambda texts: model.encode_condition(tokenize_prompts(texts, model.context_length))  # noqa: E731
    model_fn = classifier_free_guidance(Conditioned(model.denoise, encode(prompts)),
                                        Conditioned(model.denoise, encode(negatives)), 4.0)
    sampler = SamplerConfig(kind="dpm++", steps=4).build(model.schedule, model.sample_range)
    samples = sample_loop(model_fn, sampler, (2, 4, 8, 8), generator=torch.Generator().manual_seed(3), progress=False)
    expected = to_pil_images(model.decode_samples(samples), "minus_one_to_one")
    assert np.array_equal(pixels(images), pixels(expected))
    # the empty negative prompt is the null condition itself; another one changes the images
    plain = pipeline(prompts, guidance_scale=4.0, seed=3, **FAST)
    assert np.array_equal(pixels(pipeline(prompts, negative_prompt="", guidance_scale=4.0, seed=3, **FAST)),
                          pixels(plain))
    assert np.abs(pixels(images) - pixels(plain)).max() > 0
    # one negative prompt for every prompt equals repeating it per prompt
    assert np.array_equal(pixels(pipeline(prompts, negative_prompt="x", seed=3, **FAST)),
                          pixels(pipeline(prompts, negative_prompt=["x", "x"], seed=3, **FAST)))


def test_height_and_width_set_the_latent_size_and_are_checked(latent_model):
    pipeline = TextToImagePipeline(latent_model)
    assert pipeline.sample_shape() == (4, 8, 8)
    assert pipeline.sample_shape(32, 16) == (4, 16, 8)  # the VAE's factor 2
    images = pipeline("a red circle", height=32, width=16, num_images_per_prompt=2, **FAST)
    assert [image.size for image in images] == [(16, 32), (16, 32)]
    latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(1))
    wide = pipeline("a red circle", width=32, latents=latents, seed=5, **FAST)
    assert np.array_equal(pixels(wide), pixels(pipeline("a red circle", width=32, latents=latents, seed=6, **FAST)))
    with pytest.raises(UserError, match="^height must be a positive multiple of 4 \\(the VAE's downsampling times "
                                        "the UNet's\\), got 18$"):
        pipeline("a red circle", height=18, **FAST)
    with pytest.raises(UserError, match="one negative prompt, or one per prompt \\(2\\), got 3"):
        pipeline(["a", "b"], negative_prompt=["x", "y", "z"], **FAST)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_as_their_rounded_values(latent_model, tmp_path, dtype):
    half = TextToImage(latent_model.config)
    half.load_state_dict(latent_model.state_dict())
    half.to(dtype).save_pretrained(tmp_path / "half")
    loaded = mmgen.load(tmp_path / "half").state_dict()
    for name, tensor in latent_model.state_dict().items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor.to(dtype).float()), name
    assert any(not torch.equal(loaded[name], tensor) for name, tensor in latent_model.state_dict().items())


def test_bfloat16_sampling_is_close_to_float32(folder):
    full = TextToImagePipeline.from_pretrained(folder)
    half = TextToImagePipeline.from_pretrained(folder, dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    options = dict(guidance_scale=2.0, sampler="dpm++", seed=1, **FAST)
    reference, images = pixels(full("a red circle", **options)), pixels(half("a red circle", **options))
    assert np.abs(reference - images).mean() < 8  # of 255: rounding, not a different image
    with pytest.raises(UserError, match="sampling dtype must be float32, float16 or bfloat16"):
        TextToImagePipeline.from_pretrained(folder, dtype=torch.float64)


def test_sample_cli_takes_the_sd_options(folder, tmp_path, capsys):
    out = tmp_path / "samples"
    code, _, err = run_cli(["sample", "text2img", "--checkpoint", folder, "--prompt", "a red circle", "--prompt",
                            "a blue star", "--negative-prompt", "a green square", "--sampler", "dpm++", "--steps", 3,
                            "--n", 1, "--height", 8, "--width", 12, "--dtype", "bf16", "--out", out], capsys)
    assert code == 0, err
    record = json.loads((out / "samples.json").read_text())
    assert record["negative_prompt"] == "a green square" and record["dtype"] == "bf16" and record["sampler"] == "dpm++"
    assert [entry["file"] for entry in record["images"]] == ["000.png", "001.png"]
    code, _, err = run_cli(["sample", "text2img", "--checkpoint", folder, "--prompt", "a", "--height", 10,
                            "--out", tmp_path / "bad"], capsys)
    one_line_error(code, err, 1, "height must be a positive multiple of 4")
    code, _, err = run_cli(["sample", "text2img", "--checkpoint", folder, "--prompt", "a", "--negative-prompt", "x",
                            "--negative-prompt", "y", "--out", tmp_path / "bad"], capsys)
    one_line_error(code, err, 1, "one negative prompt, or one per prompt (1), got 2")
    code, _, err = run_cli(["sample", "text2img", "--checkpoint", folder, "--prompt", "a", "--sampler", "euler",
                            "--out", tmp_path / "bad"], capsys)
    one_line_error(code, err, 2, "invalid choice: 'euler' (choose from 'ddim', 'ddpm', 'dpm++')")
