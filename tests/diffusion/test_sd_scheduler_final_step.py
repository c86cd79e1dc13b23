"""A converted Stable Diffusion folder's default DDIM takes its scheduler's x0 clipping (clip_sample, clip_sample_range)
and final alpha (set_alpha_to_one: SD's folders say false, so the last step lands on timestep 0's alpha_bar), as
diffusers' DDIMScheduler of that folder does; a clip_sample true is turned off as StableDiffusionPipeline turns it
off; older folders keep clipping at the sample range and ending on x0; the export writes the keys back."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

import mmgen
from mmgen import cli
from mmgen.diffusion.stable_diffusion import from_stable_diffusion, to_stable_diffusion, x0_options_from_scheduler
from mmgen.errors import CheckpointError, ConfigError, UserError
from mmgen.pipelines import text2img as text2img_pipeline
from mmgen.pipelines.text2img import TextToImagePipeline
from tests.diffusion.test_stable_diffusion import NEGATIVE, PROMPTS, write_sd_folder

KEYS = ("clip_sample", "clip_sample_range", "set_alpha_to_one")
STEPS, GUIDANCE = 4, 5.0


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(SD folder whose DDIMScheduler says clip_sample false, set_alpha_to_one false, diffusers' pipeline of it with
    DDIMScheduler.from_pretrained(its scheduler), the converted mmgen model's folder)."""
    root = tmp_path_factory.mktemp("final-step")
    folder = write_sd_folder(root / "sd", "sd1")
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert (scheduler["clip_sample"], scheduler["set_alpha_to_one"]) == (False, False)
    assert cli.main(["convert", "stable-diffusion", "--model", str(folder), "--out", str(root / "mm")]) == 0
    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipeline.scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    pipeline.set_progress_bar_config(disable=True)
    return folder, pipeline, root / "mm"


def mmgen_latents(pipeline: TextToImagePipeline, latents: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The denoised latents (before the VAE) of `pipeline` for PROMPTS, CFG with NEGATIVE, from `latents`."""
    sampled = []

    def recording_loop(*args, **kwargs):
        sampled.append(sample_loop(*args, **kwargs))
        return sampled[-1]

    sample_loop = text2img_pipeline.sample_loop
    monkeypatch.setattr(text2img_pipeline, "sample_loop", recording_loop)
    pipeline(PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=GUIDANCE, latents=latents.clone(),
             output_type="pt", progress=False)
    monkeypatch.undo()
    return sampled[0]


def test_conversion_stores_the_scheduler_keys(converted):
    _, _, model_folder = converted
    config = json.loads((model_folder / "config.json").read_text())["config"]
    assert {key: config[key] for key in KEYS} == dict(clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=False)
    sampler = TextToImagePipeline.from_pretrained(model_folder).sampler
    assert (sampler.kind, sampler.clip_sample, sampler.set_alpha_to_one) == ("ddim", False, False)


def test_default_ddim_matches_the_folders_ddim_scheduler(converted, monkeypatch):
    _, theirs, model_folder = converted
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    expected = theirs(PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      latents=latents.clone(), output_type="latent").images
    ours = TextToImagePipeline.from_pretrained(model_folder)
    # a whole pipeline (random weights, latents up to |20|): 1e-4, the bar for whole models (one thread gives 0.0,
    # two threads 3e-5 from another summation order)
    torch.testing.assert_close(mmgen_latents(ours, latents, monkeypatch), expected, atol=1e-4, rtol=0)
    assert expected.abs().max() > ours.model.sample_range  # the old default (clip at the sample range) would clip
    # controls: ignoring either key moves the result well past the tolerance
    for ignored in (dict(set_alpha_to_one=True), dict(clip_sample=True, clip_sample_range=None)):
        ours.sampler = replace(ours.model.config.default_sampler(), **ignored)
        error = (mmgen_latents(ours, latents, monkeypatch) - expected).abs().max()
        assert error > 1e-3, ignored


def test_other_kinds_take_the_models_defaults(converted):
    _, _, model_folder = converted
    pipeline = TextToImagePipeline.from_pretrained(model_folder)
    schedule = pipeline.model.config.schedule
    for kind in ("dpm++", "ddpm"):  # set_alpha_to_one is DDIM's alone: the others always end on x0
        sampler = pipeline.sampler.override(kind=kind, steps=5).build(schedule, pipeline.model.sample_range)
        assert not sampler.clip_sample
    ddim = pipeline.sampler.override(steps=5).build(schedule, pipeline.model.sample_range)
    assert torch.equal(ddim.final_alpha_cumprod, schedule.alphas_cumprod[0])


def test_older_folders_keep_clipping_at_the_sample_range_and_ending_on_x0(converted, tmp_path):
    _, _, model_folder = converted
    meta = json.loads((model_folder / "config.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").symlink_to(model_folder / "model.safetensors")

    def write_config(**changes):
        config = {key: value for key, value in meta["config"].items() if key not in KEYS}
        (old / "config.json").write_text(json.dumps({**meta, "config": {**config, **changes}}))

    write_config()  # a folder written before the keys existed
    pipeline = TextToImagePipeline.from_pretrained(old)
    sampler = pipeline.sampler.build(pipeline.model.config.schedule, pipeline.model.sample_range)
    assert (sampler.clip_sample, sampler.clip_sample_range) == (True, pipeline.model.sample_range)
    assert sampler.final_alpha_cumprod == 1.0
    write_config(clip_sample_range=-1.0)
    with pytest.raises((CheckpointError, ConfigError), match="clip_sample_range must be positive"):
        mmgen.load(old)


def test_keys_read_from_config_or_the_class_defaults():
    assert x0_options_from_scheduler({"_class_name": "DDIMScheduler"}) == (True, 1.0, True)
    assert x0_options_from_scheduler({"_class_name": "PNDMScheduler"}) == (False, 1.0, False)
    assert x0_options_from_scheduler({"_class_name": "DPMSolverMultistepScheduler"}) == (False, 1.0, True)
    assert x0_options_from_scheduler({}) == (True, 1.0, True)  # no class diffusers has: DDIMScheduler's
    explicit = {"_class_name": "PNDMScheduler", "clip_sample": True, "clip_sample_range": 2, "set_alpha_to_one": True}
    assert x0_options_from_scheduler(explicit) == (True, 2.0, True)
    with pytest.raises(UserError, match="set_alpha_to_one 'no' is not true or false"):
        x0_options_from_scheduler({"set_alpha_to_one": "no"})
    with pytest.raises(UserError, match="clip_sample_range 0 is not a positive number"):
        x0_options_from_scheduler({"clip_sample_range": 0})


def test_export_writes_the_keys_back(converted, tmp_path):
    _, _, model_folder = converted
    model = mmgen.load(model_folder)
    to_stable_diffusion(model, tmp_path / "sd")
    scheduler = json.loads((tmp_path / "sd/scheduler/scheduler_config.json").read_text())
    assert {key: scheduler[key] for key in KEYS} == dict(clip_sample=False, clip_sample_range=1.0,
                                                         set_alpha_to_one=False)
    reread = from_stable_diffusion(tmp_path / "sd").config
    assert {key: getattr(reread, key) for key in KEYS} == {key: getattr(model.config, key) for key in KEYS}
    # a model with mmgen's defaults exports its own clipping: at its sample range, ending on x0
    model.config = replace(model.config, clip_sample=True, clip_sample_range=None, set_alpha_to_one=True)
    to_stable_diffusion(model, tmp_path / "mmgen-defaults")
    scheduler = json.loads((tmp_path / "mmgen-defaults/scheduler/scheduler_config.json").read_text())
    assert {key: scheduler[key] for key in KEYS} == dict(clip_sample=False, clip_sample_range=model.sample_range,
                                                         set_alpha_to_one=True)  # SD's pipeline never clips


def test_clip_sample_true_is_turned_off_as_stable_diffusion_pipeline_does(converted, tmp_path):
    folder, _, _ = converted
    shutil.copytree(folder, tmp_path / "sd")
    scheduler_file = tmp_path / "sd/scheduler/scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text())
    scheduler_file.write_text(json.dumps({**scheduler, "clip_sample": True, "clip_sample_range": 2.0}))
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True, safety_checker=None)
    assert theirs.scheduler.config.clip_sample is False  # the oracle's own rule
    with pytest.warns(UserWarning, match="says clip_sample true, which StableDiffusionPipeline turns off"):
        config = from_stable_diffusion(tmp_path / "sd").config
    assert (config.clip_sample, config.clip_sample_range, config.set_alpha_to_one) == (False, 2.0, False)


def test_steps_offset_other_than_one_is_made_one_as_stable_diffusion_pipeline_does(converted, tmp_path):
    folder, _, _ = converted
    shutil.copytree(folder, tmp_path / "sd")
    scheduler_file = tmp_path / "sd/scheduler/scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text())
    scheduler_file.write_text(json.dumps({**scheduler, "timestep_spacing": "leading", "steps_offset": 0}))
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True, safety_checker=None)
    assert theirs.scheduler.config.steps_offset == 1  # the oracle's own rule
    with pytest.warns(UserWarning, match="says steps_offset 0, which StableDiffusionPipeline makes 1"):
        config = from_stable_diffusion(tmp_path / "sd").config
    assert (config.timestep_spacing, config.steps_offset) == ("leading", 1)
    theirs.scheduler.set_timesteps(7)
    ours = config.default_sampler().override(steps=7).build(from_stable_diffusion(folder).schedule).timesteps
    assert ours.tolist() == theirs.scheduler.timesteps.tolist()
