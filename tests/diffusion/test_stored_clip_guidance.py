"""A text-to-image model's default CLIP guidance: samples.clip_guidance_scale is stored in config.json by its training
run and used by the pipeline, `mmgen sample text2img` and its grid when no scale is given; bad values and text
encoders without an image tower are refused in one line."""

import copy
import json
from dataclasses import replace

import pytest
import torch

import mmgen
from mmgen import cli
from mmgen.clip.preprocess import clip_input
from mmgen.diffusion.text2img import tokenize_prompts
from mmgen.errors import ConfigError, UserError
from mmgen.pipelines import text2img as text2img_pipeline
from mmgen.pipelines.text2img import TextToImagePipeline
from mmgen.recipes.diffusion import SampleGridConfig, check_clip_sampling
from tests.clip.helpers import make_clip
from tests.diffusion.test_recipe import write_config


@pytest.fixture
def trained(tmp_path):
    make_clip(0).save_pretrained(tmp_path / "clip")
    config = write_config(tmp_path, tmp_path / "clip")
    run = tmp_path / "run"
    assert cli.main(["train", "diffusion", "--config", str(config), "--out", str(run), "samples.count=2",
                     "samples.steps=2", "samples.clip_guidance_scale=40", "samples.clip_guidance_views=3",
                     "train.max_steps=2"]) == 0
    return tmp_path, config, run


def test_the_run_stores_it_and_the_pipeline_uses_it(trained, monkeypatch):
    tmp_path, _, run = trained
    stored = json.loads((run / "final" / "config.json").read_text())["config"]
    assert (stored["clip_guidance_scale"], stored["clip_guidance_views"]) == (40, 3)
    model = mmgen.load(run)
    assert (model.config.clip_guidance_scale, model.config.clip_guidance_views) == (40, 3)
    used = []
    original = text2img_pipeline.clip_guidance

    def recording(model_fn, schedule, score_fn, guidance_scale):
        used.append(guidance_scale)
        return original(model_fn, schedule, score_fn, guidance_scale)

    monkeypatch.setattr(text2img_pipeline, "clip_guidance", recording)
    pipeline = TextToImagePipeline(model)
    sample = lambda **options: pipeline(["a red circle", "a blue square"], steps=3, progress=False,
                                        output_type="pt", seed=3, **options)
    default = sample()
    assert used == [40]
    torch.testing.assert_close(default, sample(clip_guidance_scale=40.0, clip_guidance_views=3), rtol=0, atol=0)
    assert (default - sample(clip_guidance_views=1)).abs().max() > 1e-5  # the stored views are used
    unguided = sample(clip_guidance_scale=0.0)
    assert used == [40, 40, 40]  # 0: no CLIP guidance wrapper at all
    assert (default - unguided).abs().max() > 1e-4  # the stored scale is what changed the images
    out = tmp_path / "samples"
    assert cli.main(["sample", "text2img", "--checkpoint", str(run), "--prompt", "a red circle", "--n", "1",
                     "--steps", "2", "--out", str(out)]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["clip_guidance_scale"] == 40 and used[-1] == 40
    assert record["guidance_scale"] == model.config.guidance_scale  # recorded as used, not as null
    out = tmp_path / "samples-off"
    assert cli.main(["sample", "text2img", "--checkpoint", str(run), "--prompt", "a red circle", "--n", "1",
                     "--steps", "2", "--clip-guidance", "0", "--out", str(out)]) == 0
    assert json.loads((out / "samples.json").read_text())["clip_guidance_scale"] == 0
    assert used[-1] == 40 and len(used) == 4  # the second command added none


def test_a_folder_without_the_key_samples_without_clip_guidance(trained):
    _, _, run = trained
    meta = json.loads((run / "final" / "config.json").read_text())
    del meta["config"]["clip_guidance_scale"]
    (run / "final" / "config.json").write_text(json.dumps(meta))
    assert mmgen.load(run / "final").config.clip_guidance_scale == 0.0


def test_bad_values_are_one_line(trained, capsys):
    tmp_path, config, _ = trained
    capsys.readouterr()
    for value, message in (("-1", "clip_guidance_scale must be a finite number >= 0"),
                           ("nan", "'samples.clip_guidance_scale' must be a finite number")):
        assert cli.main(["train", "diffusion", "--config", str(config), "--out", str(tmp_path / "bad"),
                         f"samples.clip_guidance_scale={value}"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert cli.main(["train", "diffusion", "--config", str(config), "--out", str(tmp_path / "bad"),
                     "samples.clip_guidance_scale=5", "samples.guidance_choices=[1.0, 3.0]"]) == 2
    assert "set one or the other" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_text_encoder_without_an_image_tower_is_refused(trained):
    config = mmgen.load(trained[2]).config
    text_only = replace(config.text_encoder, vision=None)
    with pytest.raises(ValueError, match="needs a CLIP with an image tower"):
        replace(config, text_encoder=text_only, clip_guidance_scale=2.0)
    assert replace(config, text_encoder=text_only, clip_guidance_scale=0.0).clip_guidance_scale == 0.0
    with pytest.raises(ValueError, match="finite number >= 0"):
        replace(config, clip_guidance_scale=float("inf"))


def test_clip_rerank_keeps_the_candidate_clip_matches_best(trained):
    """k candidates per image are the images of k per prompt without reranking (the same noise, in order); the one
    kept is the one with the highest CLIP logit against its prompt, computed here by hand."""
    model = mmgen.load(trained[2])
    model.config.clip_guidance_scale = 0.0
    pipeline = TextToImagePipeline(model)
    prompts = ["a red circle", "a blue square", "a green star"]
    common = dict(steps=2, progress=False, output_type="pt", seed=4)
    candidates = pipeline(prompts, num_images_per_prompt=3, clip_rerank=1, **common)
    kept = pipeline(prompts, clip_rerank=3, **common)
    clip = model.text_encoder
    text = clip.encode_text(tokenize_prompts(prompts, clip.config.text.context_length))
    image = clip.encode_image(clip_input(candidates, clip.config.vision.image_size))
    logits = (image.view(3, 3, -1) * text[:, None]).sum(-1)
    best = logits.argmax(dim=1)
    assert len(set(best.tolist())) > 1 or best.tolist() != [0, 0, 0]  # the check could fail: not always the first
    torch.testing.assert_close(kept, candidates.view(3, 3, *candidates.shape[1:])[torch.arange(3), best],
                               rtol=0, atol=0)
    two = pipeline(prompts, num_images_per_prompt=2, clip_rerank=3, **common)
    assert two.shape == (6, *candidates.shape[1:])


def test_the_run_stores_clip_rerank_and_bad_values_are_refused(tmp_path, capsys):
    make_clip(0).save_pretrained(tmp_path / "clip")
    config = write_config(tmp_path, tmp_path / "clip")
    run = tmp_path / "run"
    assert cli.main(["train", "diffusion", "--config", str(config), "--out", str(run), "samples.count=2",
                     "samples.steps=2", "samples.clip_rerank=2", "train.max_steps=2"]) == 0
    model = mmgen.load(run)
    assert model.config.clip_rerank == 2
    pipeline = TextToImagePipeline(model)
    common = dict(steps=2, progress=False, output_type="pt", seed=1)
    torch.testing.assert_close(pipeline(["a red circle"], **common), pipeline(["a red circle"], clip_rerank=2, **common),
                               rtol=0, atol=0)
    with pytest.raises(UserError, match="give one or the other"):
        pipeline(["a red circle"], latents=torch.randn(1, 3, 16, 16), **common)
    with pytest.raises(UserError, match="clip_rerank must be an integer >= 1"):
        pipeline(["a red circle"], clip_rerank=0, **common)
    capsys.readouterr()
    for overrides, message in ((["samples.clip_rerank=0"], "clip_rerank must be an integer >= 1"),
                               (["samples.clip_guidance_views=0"], "clip_guidance_views must be an integer >= 1"),
                               (["samples.clip_rerank=2", "samples.guidance_choices=[1.0, 3.0]"],
                                "set one or the other")):
        assert cli.main(["train", "diffusion", "--config", str(config), "--out", str(tmp_path / "bad"),
                         *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
    assert cli.main(["sample", "text2img", "--checkpoint", str(run), "--prompt", "a red circle", "--n", "1",
                     "--steps", "2", "--clip-rerank", "0", "--out", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s").exists()


def test_check_clip_sampling_refuses_a_text_encoder_alone(trained):
    """What `mmgen train diffusion` and `mmgen finetune diffusion` run before anything is written."""
    clip = mmgen.load(trained[2]).text_encoder
    text_only = copy.deepcopy(clip)
    text_only.config = replace(clip.config, vision=None)
    check_clip_sampling(SampleGridConfig(clip_guidance_scale=5.0, clip_rerank=3), clip, "x")  # has a vision tower
    check_clip_sampling(SampleGridConfig(clip_guidance_scale=0.0, clip_rerank=1), text_only, "x")  # asks nothing
    for samples, name in ((SampleGridConfig(clip_guidance_scale=5.0), "clip_guidance_scale"),
                          (SampleGridConfig(clip_rerank=2), "clip_rerank")):
        with pytest.raises(ConfigError, match=f"samples.{name} needs a CLIP with an image tower; the base"):
            check_clip_sampling(samples, text_only, "the base's text encoder")
