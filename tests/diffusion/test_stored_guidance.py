"""The guidance scale a text-to-image model samples with by default: stored in its config.json by its training run,
chosen there by the model's own evaluation (samples.guidance_choices), and used when no --guidance is given."""

import json

import torch
import yaml

import mmgen
from mmgen import cli
from mmgen.pipelines import text2img as text2img_pipeline
from mmgen.pipelines.text2img import TextToImagePipeline
from tests.clip.helpers import make_clip
from tests.diffusion.test_recipe import write_config


def test_the_run_stores_the_guidance_its_evaluation_chose(tmp_path):
    make_clip(0).save_pretrained(tmp_path / "clip")
    config = write_config(tmp_path, tmp_path / "clip")
    assert cli.main(["train", "diffusion", "--config", str(config), "--out", str(tmp_path / "run"),
                     "samples.count=4", "samples.guidance_choices=[4.0, 1.0, 2.0]"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [record for record in records if "samples/guidance_scale" in record][-1]
    accuracies = {scale: last[f"samples/clip_prompt_accuracy@{scale:g}"] for scale in (1.0, 2.0, 4.0)}
    best = max(accuracies.values())
    assert last["samples/guidance_scale"] == min(scale for scale, value in accuracies.items() if value == best)
    stored = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert stored["config"]["guidance_scale"] == last["samples/guidance_scale"]
    assert mmgen.load(tmp_path / "run").config.guidance_scale == last["samples/guidance_scale"]


def test_without_choices_the_recipe_scale_is_stored(tmp_path):
    make_clip(0).save_pretrained(tmp_path / "clip")
    config = write_config(tmp_path, tmp_path / "clip")
    assert cli.main(["train", "diffusion", "--config", str(config), "--out", str(tmp_path / "run"),
                     "samples.guidance_scale=2.5", "train.max_steps=2"]) == 0
    assert mmgen.load(tmp_path / "run").config.guidance_scale == 2.5
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["samples"]["guidance_choices"] is None


def test_the_pipeline_samples_with_the_stored_scale_when_none_is_given(tmp_path, monkeypatch):
    make_clip(0).save_pretrained(tmp_path / "clip")
    config = write_config(tmp_path, tmp_path / "clip")
    assert cli.main(["train", "diffusion", "--config", str(config), "--out", str(tmp_path / "run"),
                     "samples.count=0", "train.max_steps=2"]) == 0
    used = []

    def recording(model, inputs, guidance_scale, **options):
        used.append(guidance_scale)
        return text2img_pipeline.guided_model_fn.__wrapped__(model, inputs, guidance_scale, **options)

    recording.__wrapped__ = text2img_pipeline.guided_model_fn
    monkeypatch.setattr(text2img_pipeline, "guided_model_fn", recording)
    model = mmgen.load(tmp_path / "run")
    pipeline = TextToImagePipeline(model)
    sample = lambda **options: pipeline(["a red circle"], steps=2, progress=False, output_type="pt", **options)
    model.config.guidance_scale = 1.5
    assert torch.equal(sample(), sample(guidance_scale=1.5))
    model.config.guidance_scale = None  # a folder written before models stored one: 3
    sample()
    sample(guidance_scale=0.0)
    assert used == [1.5, 1.5, 3.0, 0.0]


def test_the_run_stores_its_grid_sampler_and_steps_as_the_models_default(tmp_path, capsys):
    """samples.sampler / samples.steps become config.json's sampler / sampling_steps; the pipeline and `mmgen sample
    text2img` use them when not told otherwise; a folder written before the keys samples with DDIM, 50 steps."""
    make_clip(0).save_pretrained(tmp_path / "clip")
    config = write_config(tmp_path, tmp_path / "clip")
    assert cli.main(["train", "diffusion", "--config", str(config), "--out", str(tmp_path / "run"),
                     "samples.count=2", "samples.sampler=ddpm", "samples.steps=3", "train.max_steps=2"]) == 0
    stored = json.loads((tmp_path / "run" / "final" / "config.json").read_text())["config"]
    assert (stored["sampler"], stored["sampling_steps"]) == ("ddpm", 3)
    model = mmgen.load(tmp_path / "run")
    pipeline = TextToImagePipeline(model)
    assert (pipeline.sampler.kind, pipeline.sampler.steps) == ("ddpm", 3)
    sample = lambda **options: pipeline(["a red circle"], progress=False, output_type="pt", seed=5, **options)
    default = sample()
    torch.testing.assert_close(default, sample(sampler="ddpm", steps=3), rtol=0, atol=0)
    assert (default - sample(sampler="ddim", steps=3)).abs().max() > 1e-3  # the stored kind is what made them equal
    old = tmp_path / "old"  # a folder written before the keys existed
    old.mkdir()
    (old / "model.safetensors").symlink_to(tmp_path / "run" / "final" / "model.safetensors")
    meta = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    meta["config"] = {key: value for key, value in meta["config"].items() if key not in ("sampler", "sampling_steps")}
    (old / "config.json").write_text(json.dumps(meta))
    old_sampler = TextToImagePipeline.from_pretrained(old).sampler
    assert (old_sampler.kind, old_sampler.steps) == ("ddim", 50)
    for folder, options, expected in ((tmp_path / "run", [], ("ddpm", 3)), (old, ["--steps", "2"], ("ddim", 2))):
        out = tmp_path / f"samples-{folder.name}"  # the CLI's defaults are the model's
        assert cli.main(["sample", "text2img", "--checkpoint", str(folder), "--prompt", "a red circle", "--n", "1",
                         "--out", str(out), *options]) == 0
        record = json.loads((out / "samples.json").read_text())
        assert (record["sampler"], record["steps"]) == expected
    capsys.readouterr()
    assert cli.main(["train", "diffusion", "--config", str(config), "--out", str(tmp_path / "bad"),
                     "samples.sampler=euler"]) == 2
    assert "sampler must be one of" in capsys.readouterr().err
