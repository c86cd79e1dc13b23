"""The text-to-image model (frozen CLIP text encoder + UNet), its folder, and the sampling pipeline."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mmgen
from mmgen.clip import CLIPTokenizer
from mmgen.diffusion import TextToImage, TextToImageConfig, UNetConfig, tokenize_prompts
from mmgen.errors import CheckpointError, UserError
from mmgen.pipelines import TextToImagePipeline
from tests.clip.helpers import make_clip
from tests.diffusion.helpers import TINY_UNET, tiny_text2img


@pytest.fixture(scope="module")
def model():
    return tiny_text2img()


def test_empty_prompt_is_start_and_end_of_text_only():
    tokenizer = CLIPTokenizer(16)
    tokens = tokenize_prompts(["a red circle", "", "  "], 16)
    assert torch.equal(tokens[0], tokenizer("a red circle")[0])
    empty = torch.zeros(16, dtype=torch.long)
    empty[:2] = torch.tensor([tokenizer.sot_token_id, tokenizer.eot_token_id])
    assert torch.equal(tokens[1], empty) and torch.equal(tokens[2], empty)


def test_conditioning_comes_from_the_frozen_clip_text_tower(model):
    clip = make_clip(0)
    tokens = tokenize_prompts(["a red circle", ""], model.context_length)
    encoding = model.encode_text(tokens)
    expected = clip.encode_text_tokens(tokens)
    for got, want in zip(encoding, expected):
        torch.testing.assert_close(got, want)
    assert model.config.unet.context_dim == clip.config.text.width
    assert model.config.unet.pooled_dim == clip.config.embed_dim
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert all(p.requires_grad for p in model.unet.parameters())
    model.train()
    assert model.unet.training and not model.text_encoder.training
    model.eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 90])
    assert torch.equal(model(x, t, tokens), model.denoise(x, t, encoding))
    other = model.denoise(x, t, model.encode_text(tokenize_prompts(["a blue star", ""], model.context_length)))
    assert not torch.allclose(other[0], model(x, t, tokens)[0])  # the text matters
    assert torch.equal(other[1], model(x, t, tokens)[1])


def test_save_load_round_trip_is_exact_and_self_contained(model, tmp_path):
    model.save_pretrained(tmp_path / "t2i")
    assert sorted(p.name for p in (tmp_path / "t2i").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "t2i" / "config.json").read_text())
    assert meta["model_type"] == "text2img" and meta["config"]["text_encoder"]["text"]["width"] == 64
    loaded = mmgen.load(tmp_path / "t2i")
    assert isinstance(loaded, TextToImage) and not loaded.training
    stored = load_file(str(tmp_path / "t2i" / "model.safetensors"))
    assert any(name.startswith("text_encoder.vision.") for name in stored)  # the whole CLIP is kept
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tokens = tokenize_prompts(["a red circle", ""], model.context_length)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 60])
    assert torch.equal(loaded(x, t, tokens), model(x, t, tokens))
    assert loaded.config.schedule.prediction_type == model.config.schedule.prediction_type
    torch.testing.assert_close(loaded.schedule.alphas_cumprod, model.schedule.alphas_cumprod, atol=0, rtol=0)


def test_config_checks_the_unet_fits_the_text_encoder():
    clip_config = make_clip(0).config
    good = UNetConfig(**TINY_UNET, context_dim=64, pooled_dim=48)
    TextToImageConfig(image_size=8, unet=good, text_encoder=clip_config)
    with pytest.raises(ValueError, match="unet.context_dim is 32, the text encoder needs 64"):
        TextToImageConfig(image_size=8, unet=dataclasses.replace(good, context_dim=32), text_encoder=clip_config)
    with pytest.raises(ValueError, match="multiple of 2"):
        TextToImageConfig(image_size=9, unet=good, text_encoder=clip_config)
    with pytest.raises(ValueError, match="out_channels"):
        TextToImageConfig(image_size=8, unet=dataclasses.replace(good, out_channels=6), text_encoder=clip_config)


def test_pipeline_is_deterministic_by_seed(model):
    pipeline = TextToImagePipeline(model)
    options = dict(num_images_per_prompt=2, steps=3, progress=False)
    first = pipeline(["a red circle", "a blue square"], seed=3, **options)
    again = pipeline(["a red circle", "a blue square"], seed=3, **options)
    other = pipeline(["a red circle", "a blue square"], seed=4, **options)
    assert len(first) == 4 and first[0].size == (8, 8) and first[0].mode == "RGB"
    assert [image.tobytes() for image in first] == [image.tobytes() for image in again]
    assert [image.tobytes() for image in first] != [image.tobytes() for image in other]
    # one prompt alone gives the images it gets in a batch (prompt-major order, one noise draw per image)
    alone = pipeline(["a red circle"], seed=3, **options)
    difference = np.abs(np.asarray(alone[1], dtype=int) - np.asarray(first[1], dtype=int))
    assert len(alone) == 2 and difference.max() <= 1  # equal up to a rounding of batch-size-dependent kernels


@pytest.mark.parametrize("options", [dict(sampler="ddpm"), dict(eta=0.5), dict(guidance_scale=1.0),
                                     dict(clip_guidance_scale=2.0)], ids=["ddpm", "eta", "no-cfg", "clip-guidance"])
def test_pipeline_options_change_the_images_reproducibly(model, options):
    pipeline = TextToImagePipeline(model)
    base = pipeline("a red circle", steps=3, seed=1, progress=False)
    changed = pipeline("a red circle", steps=3, seed=1, progress=False, **options)
    assert changed[0].tobytes() != base[0].tobytes()
    assert pipeline("a red circle", steps=3, seed=1, progress=False, **options)[0].tobytes() == changed[0].tobytes()


def test_pipeline_bad_inputs(model):
    pipeline = TextToImagePipeline(model)
    with pytest.warns(UserWarning, match="prompt 1 is empty"):
        assert len(pipeline([""], steps=2, progress=False)) == 1
    bad = [(dict(steps=0), "steps must lie between 1 and the model's 100"),
           (dict(steps=101), "steps must lie between 1 and the model's 100"),
           (dict(guidance_scale=-1.0), "guidance scales must be >= 0"),
           (dict(sampler="euler"), "unknown sampler 'euler'"),
           (dict(sampler="ddpm", eta=0.5), "DDIM option"),
           (dict(num_images_per_prompt=0), "images per prompt"),
           (dict(guidance_rescale=1.5), "guidance_rescale must lie in \\[0, 1\\]"),
           (dict(guidance_interval=(80, 50)), "0 <= t_low <= t_high, or null; got \\[80, 50\\]")]
    for options, message in bad:
        with pytest.raises(UserError, match=message):
            pipeline("a red circle", progress=False, **options)
    with pytest.raises(UserError, match="no prompt"):
        pipeline([], progress=False)


def test_from_pretrained_refuses_other_model_types(model, tmp_path):
    make_clip(1).save_pretrained(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="holds a 'clip' model, not a 'text2img' one"):
        TextToImagePipeline.from_pretrained(tmp_path / "clip")
    model.save_pretrained(tmp_path / "t2i")
    with pytest.raises(CheckpointError, match="holds a 'text2img' model, not a 'clip' one"):
        TextToImagePipeline.from_pretrained(tmp_path / "t2i", clip_model=tmp_path / "t2i")
    pipeline = TextToImagePipeline.from_pretrained(tmp_path / "t2i", clip_model=tmp_path / "clip")
    assert pipeline.clip is not pipeline.model.text_encoder and pipeline.clip.logit_scale is not None
