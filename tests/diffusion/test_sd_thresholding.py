"""A converted Stable Diffusion folder whose scheduler says `thresholding: true` samples with Imagen's dynamic
thresholding (dynamic_thresholding_ratio, sample_max_value) as StableDiffusionPipeline does with that folder's DDIM and
DPM-Solver++ schedulers; the keys go through SamplerConfig and TextToImageConfig, older model folders load without them,
bad values are one line, and the export writes them back."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

import mmgen
from mmgen import cli
from mmgen.diffusion.samplers import DDIMSampler, DPMSolverSampler, SamplerConfig
from mmgen.diffusion.schedule import NoiseSchedule
from mmgen.diffusion.stable_diffusion import from_stable_diffusion, thresholding_from_scheduler, to_stable_diffusion
from mmgen.errors import CheckpointError, ConfigError, UserError
from mmgen.pipelines.text2img import TextToImagePipeline
from tests.diffusion.helpers import older_folder
from tests.diffusion.test_sd_scheduler_final_step import GUIDANCE, STEPS, mmgen_latents
from tests.diffusion.test_stable_diffusion import NEGATIVE, PROMPTS, write_sd_folder
from tests.test_cli import one_line_error

KEYS = ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")
# random-init latents reach |x0| ~ 20: a ratio below 1 and a max value above 1 make s = 1.5, well inside that range
THRESHOLDING = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
SCHEDULERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(SD folder whose DDIMScheduler thresholds, the converted mmgen model's folder)."""
    root = tmp_path_factory.mktemp("thresholding")
    folder = write_sd_folder(root / "sd", "sd1")
    scheduler_file = folder / "scheduler/scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), **THRESHOLDING}))
    assert cli.main(["convert", "stable-diffusion", "--model", str(folder), "--out", str(root / "mm")]) == 0
    return folder, root / "mm"


def diffusers_latents(folder, kind: str, latents: torch.Tensor) -> torch.Tensor:
    """StableDiffusionPipeline's denoised latents for PROMPTS (CFG, NEGATIVE) with the folder's scheduler as `kind`."""
    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipeline.scheduler = SCHEDULERS[kind].from_pretrained(folder / "scheduler")
    assert pipeline.scheduler.config.thresholding  # the oracle thresholds
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    latents=latents.clone(), output_type="latent").images


def test_conversion_stores_the_keys(converted):
    _, model_folder = converted
    config = json.loads((model_folder / "config.json").read_text())["config"]
    assert {key: config[key] for key in KEYS} == THRESHOLDING
    assert config["use_clipped_model_output"] is False  # StableDiffusionPipeline's DDIM keeps the network's epsilon
    sampler = TextToImagePipeline.from_pretrained(model_folder).sampler
    assert {key: getattr(sampler, key) for key in KEYS} == THRESHOLDING


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_thresholded_sampling_matches_stable_diffusion_pipeline(converted, kind, monkeypatch):
    folder, model_folder = converted
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    expected = diffusers_latents(folder, kind, latents)
    ours = TextToImagePipeline.from_pretrained(model_folder)
    ours.sampler = ours.sampler.override(kind=kind)
    # the bar of the other whole-pipeline comparisons (test_sd_scheduler_final_step)
    torch.testing.assert_close(mmgen_latents(ours, latents, monkeypatch), expected, atol=1e-4, rtol=0)
    # control: without thresholding the latents are far away, so the comparison above can fail
    sampler = ours.sampler
    ours.sampler = replace(sampler, thresholding=False)
    assert (mmgen_latents(ours, latents, monkeypatch) - expected).abs().max() > 0.1
    if kind == "ddim":  # and DDIM's epsilon recomputed from the thresholded x0 (mmgen's default) is not diffusers'
        ours.sampler = replace(sampler, use_clipped_model_output=True)
        assert (mmgen_latents(ours, latents, monkeypatch) - expected).abs().max() > 1e-2


def test_export_writes_the_keys_back(converted, tmp_path, monkeypatch):
    _, model_folder = converted
    model = mmgen.load(model_folder)
    to_stable_diffusion(model, tmp_path / "sd")
    scheduler = json.loads((tmp_path / "sd/scheduler/scheduler_config.json").read_text())
    assert {key: scheduler[key] for key in KEYS} == THRESHOLDING
    reread = from_stable_diffusion(tmp_path / "sd").config
    assert {key: getattr(reread, key) for key in KEYS} == THRESHOLDING
    # diffusers samples the exported folder as mmgen samples the model
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    expected = diffusers_latents(tmp_path / "sd", "ddim", latents)
    torch.testing.assert_close(mmgen_latents(TextToImagePipeline(model), latents, monkeypatch), expected,
                               atol=1e-4, rtol=0)


def test_keys_read_from_config_or_the_class_defaults():
    for name in ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler"):
        assert thresholding_from_scheduler({"_class_name": name}) == (False, 0.995, 1.0), name
    assert thresholding_from_scheduler({"_class_name": "DDIMScheduler", **THRESHOLDING}) == (True, 0.9, 1.5)
    assert thresholding_from_scheduler({"thresholding": True}) == (True, 0.995, 1.0)  # DDIMScheduler's defaults
    # with thresholding off the other two mean nothing to diffusers: not read, so not refused
    assert thresholding_from_scheduler({"dynamic_thresholding_ratio": 7, "sample_max_value": "x"}) == (False, 0.995,
                                                                                                       1.0)
    bad = [({"thresholding": "yes"}, "thresholding 'yes' is not true or false"),
           ({"thresholding": True, "dynamic_thresholding_ratio": 0}, "dynamic_thresholding_ratio 0 is not a number in"),
           ({"thresholding": True, "dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio 1.5 is not"),
           ({"thresholding": True, "sample_max_value": 0.5}, "sample_max_value 0.5 is not a finite number >= 1"),
           ({"thresholding": True, "sample_max_value": "2"}, "sample_max_value '2' is not a finite number >= 1")]
    for config, message in bad:
        with pytest.raises(UserError, match=message):
            thresholding_from_scheduler(config)


def test_a_bad_value_in_the_folder_is_one_line(converted, tmp_path, capsys):
    folder, _ = converted
    shutil.copytree(folder, tmp_path / "sd")
    scheduler_file = tmp_path / "sd/scheduler/scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), "sample_max_value": 0.5}))
    code = cli.main(["convert", "stable-diffusion", "--model", str(tmp_path / "sd"), "--out", str(tmp_path / "mm")])
    one_line_error(code, capsys.readouterr().err, 1, "the scheduler's sample_max_value 0.5 is not a finite number")
    assert not (tmp_path / "mm").exists()


def test_sampler_config_takes_the_keys():
    schedule = NoiseSchedule(num_train_timesteps=100)
    both = SamplerConfig(steps=5, clip_sample=True, **THRESHOLDING)
    ddim = both.build(schedule, sample_range=4.0)  # clip_sample and thresholding: thresholding wins, as in diffusers
    assert isinstance(ddim, DDIMSampler) and ddim.thresholding and not ddim.clip_sample
    assert (ddim.dynamic_thresholding_ratio, ddim.sample_max_value, ddim.use_clipped_model_output) == (0.9, 1.5, True)
    assert not replace(both, use_clipped_model_output=False).build(schedule).use_clipped_model_output
    solver = both.override(kind="dpm++").build(schedule)
    assert isinstance(solver, DPMSolverSampler) and solver.thresholding and not solver.clip_sample
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    assert solver.processed_x0(x0).abs().max() <= 1 < x0.abs().max()
    plain = SamplerConfig(steps=5).build(schedule, sample_range=4.0)
    assert (plain.thresholding, plain.clip_sample, plain.clip_sample_range) == (False, True, 4.0)
    for changes, message in ((dict(dynamic_thresholding_ratio=0.0), "dynamic_thresholding_ratio must lie in"),
                             (dict(sample_max_value=0.9), "sample_max_value must be a finite number >= 1")):
        with pytest.raises(UserError, match=message):
            replace(both, **changes).build(schedule)


def test_older_model_folders_load_without_the_keys(converted, tmp_path):
    _, model_folder = converted
    old = tmp_path / "old"
    write_config = older_folder(model_folder, old, KEYS + ("use_clipped_model_output",))
    write_config()  # a folder written before the keys existed
    sampler = TextToImagePipeline.from_pretrained(old).sampler
    assert (sampler.thresholding, sampler.dynamic_thresholding_ratio, sampler.sample_max_value,
            sampler.use_clipped_model_output) == (False, 0.995, 1.0, True)
    write_config(thresholding=True, dynamic_thresholding_ratio=1.2)
    with pytest.raises((CheckpointError, ConfigError), match="dynamic_thresholding_ratio must lie in \\(0, 1\\]"):
        mmgen.load(old)
    write_config(thresholding=True, sample_max_value=0.5)
    with pytest.raises((CheckpointError, ConfigError), match="sample_max_value must be a finite number >= 1"):
        mmgen.load(old)
