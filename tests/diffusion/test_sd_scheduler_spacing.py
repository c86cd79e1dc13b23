"""A converted Stable Diffusion folder samples with its scheduler's timestep spacing and steps_offset ("leading", 1
in SD's folders), as diffusers' DDIM and DPM-Solver schedulers of that folder do; models trained by mmgen and folders
written before these keys keep "trailing", 0; the export writes them back."""

import json
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

import mmgen
from mmgen import cli
from mmgen.diffusion.stable_diffusion import spacing_from_scheduler, to_stable_diffusion
from mmgen.errors import CheckpointError, ConfigError, UserError
from mmgen.pipelines.text2img import TextToImagePipeline
from tests.diffusion.helpers import older_folder, tiny_text2img
from tests.diffusion.test_stable_diffusion import NEGATIVE, PROMPTS, write_sd_folder

SCHEDULERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(SD folder whose DDIMScheduler says "leading" + steps_offset 1, the converted mmgen model's folder)."""
    root = tmp_path_factory.mktemp("spacing")
    folder = write_sd_folder(root / "sd", "sd1")
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert (scheduler["timestep_spacing"], scheduler["steps_offset"]) == ("leading", 1)
    assert cli.main(["convert", "stable-diffusion", "--model", str(folder), "--out", str(root / "mm")]) == 0
    return folder, root / "mm"


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_default_sampler_visits_diffusers_timesteps(converted, kind):
    folder, model_folder = converted
    pipeline = TextToImagePipeline.from_pretrained(model_folder)
    assert (pipeline.sampler.spacing, pipeline.sampler.steps_offset) == ("leading", 1)
    scheduler = SCHEDULERS[kind].from_pretrained(folder / "scheduler")
    for steps in (4, 7, 25, 50):
        scheduler.set_timesteps(steps)
        ours = pipeline.sampler.override(kind=kind, steps=steps).build(pipeline.model.schedule).timesteps
        assert ours.tolist() == scheduler.timesteps.tolist(), steps
        trailing = replace(pipeline.sampler, kind=kind, steps=steps, spacing="trailing").build(pipeline.model.schedule)
        assert trailing.timesteps.tolist() != ours.tolist()  # the spacing read is what makes them equal


def test_dpm_solver_images_match_the_folders_own_scheduler(converted):
    folder, model_folder = converted
    theirs = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    theirs.scheduler = DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler")
    ours = TextToImagePipeline.from_pretrained(model_folder)  # its default sampler: the folder's spacing, no clipping
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    options = dict(negative_prompt=[NEGATIVE] * 2, num_inference_steps=5, guidance_scale=5.0, output_type="pt")
    expected = theirs(PROMPTS, latents=latents.clone(), **options).images
    images = ours(PROMPTS, negative_prompt=NEGATIVE, sampler="dpm++", steps=5, guidance_scale=5.0,
                  latents=latents.clone(), output_type="pt", progress=False)
    torch.testing.assert_close((images + 1) / 2, expected, atol=1e-3, rtol=0)
    assert expected.std() > 0.02  # not flat images: the comparison means something


def test_mmgen_models_and_older_folders_keep_trailing(converted, tmp_path):
    _, model_folder = converted
    model = tiny_text2img()
    assert (model.config.timestep_spacing, model.config.steps_offset) == ("trailing", 0)
    assert TextToImagePipeline(model).sampler.spacing == "trailing"
    old = tmp_path / "old"
    write_config = older_folder(model_folder, old, ("timestep_spacing", "steps_offset"))
    write_config()  # a folder written before the keys existed
    pipeline = TextToImagePipeline.from_pretrained(old)
    assert (pipeline.sampler.spacing, pipeline.sampler.steps_offset) == ("trailing", 0)
    write_config(timestep_spacing="karras")
    with pytest.raises((CheckpointError, ConfigError), match="'config.timestep_spacing' must be one of"):
        mmgen.load(old)


def test_spacing_read_from_config_keys_or_the_class_defaults():
    assert spacing_from_scheduler({"_class_name": "DDIMScheduler", "timestep_spacing": "trailing"}) == ("trailing", 0)
    assert spacing_from_scheduler({"_class_name": "PNDMScheduler", "steps_offset": 1}) == ("leading", 1)
    assert spacing_from_scheduler({"_class_name": "DPMSolverMultistepScheduler"}) == ("linspace", 0)
    with pytest.raises(UserError, match="timestep_spacing 'karras' is not one mmgen samples with"):
        spacing_from_scheduler({"timestep_spacing": "karras"})


def test_export_writes_the_spacing_back(converted, tmp_path):
    _, model_folder = converted
    model = mmgen.load(model_folder)
    to_stable_diffusion(model, tmp_path / "sd")
    scheduler = json.loads((tmp_path / "sd/scheduler/scheduler_config.json").read_text())
    assert (scheduler["timestep_spacing"], scheduler["steps_offset"]) == ("leading", 1)
    model.config.steps_offset = 0
    with pytest.raises(UserError, match="'leading' timestep spacing with steps_offset 0"):
        to_stable_diffusion(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
