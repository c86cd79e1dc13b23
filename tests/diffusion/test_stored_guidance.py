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
