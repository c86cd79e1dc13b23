"""DPM-Solver++(2M) step for step against diffusers' DPMSolverMultistepScheduler, and as a configured sampler."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from mmgen.diffusion import DPMSolverSampler, NoiseSchedule, SamplerConfig, sample_loop, solver_timesteps
from mmgen.errors import UserError

from .test_samplers import oracle

SHAPE = (2, 4, 8, 8)
BETAS = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),  # Stable Diffusion's
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}
# (timestep_spacing, num_inference_steps, steps_offset): SD's leading + offset 1, steps that do not divide 1000, one step
SPACINGS = [("leading", 20, 1), ("leading", 13, 0), ("trailing", 20, 0), ("trailing", 13, 0), ("linspace", 25, 0),
            ("trailing", 1, 0)]
THRESHOLDING = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)


def check_against_diffusers(betas, prediction_type, spacing, zero_terminal_snr=False, **options):
    """mmgen's and diffusers' solver on the same random latents and network outputs: equal timesteps, and every
    step's result within 1e-5 (relative to the step's scale: cosine's epsilon x0 at t = 999 reaches ~1e5)."""
    name, steps, offset = spacing
    schedule = NoiseSchedule(**BETAS[betas], prediction_type=prediction_type,
                             rescale_zero_terminal_snr=zero_terminal_snr)
    sampler = DPMSolverSampler(schedule, timestep_spacing=name, steps_offset=offset, **options)
    reference = DPMSolverMultistepScheduler(**BETAS[betas], prediction_type=prediction_type, timestep_spacing=name,
                                            steps_offset=offset, algorithm_type="dpmsolver++", solver_order=2,
                                            lower_order_final=True, rescale_betas_zero_snr=zero_terminal_snr,
                                            **options)
    sampler.set_timesteps(steps)
    reference.set_timesteps(steps)
    assert torch.equal(sampler.timesteps, reference.timesteps)
    data = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=data)
    expected = x.clone()
    for t in sampler.timesteps.tolist():
        model_output = torch.randn(SHAPE, generator=data)
        x = sampler.step(model_output, t, x)
        expected = reference.step(model_output, t, expected).prev_sample
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("betas", list(BETAS))
def test_matches_diffusers_per_schedule_and_prediction(betas, prediction_type):
    check_against_diffusers(betas, prediction_type, ("leading", 20, 1))


@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda spacing: f"{spacing[0]}-{spacing[1]}")
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers_per_spacing(spacing, prediction_type):
    check_against_diffusers("scaled_linear", prediction_type, spacing)


@pytest.mark.parametrize("betas", ["scaled_linear", "squaredcos_cap_v2"])
def test_matches_diffusers_with_dynamic_thresholding(betas):
    check_against_diffusers(betas, "epsilon", ("trailing", 13, 0), **THRESHOLDING)


def test_matches_diffusers_from_a_zero_snr_last_timestep():
    # alpha_bar = 0 at t = 999: both take it as 2**-24, so the first step's log-SNR stays finite
    check_against_diffusers("scaled_linear", "v_prediction", ("trailing", 10, 0), zero_terminal_snr=True)


def test_the_second_order_step_differs_from_ddim():
    # the multistep correction must be in use: after the first step, DPM-Solver++ and DDIM part ways
    schedule = NoiseSchedule(**BETAS["scaled_linear"])
    dpm = SamplerConfig(kind="dpm++", steps=5, clip_sample=False).build(schedule)
    ddim = SamplerConfig(kind="ddim", steps=5, clip_sample=False).build(schedule)
    assert torch.equal(dpm.timesteps, ddim.timesteps)  # trailing spacing: the same timesteps
    data = torch.Generator().manual_seed(1)
    x, model_outputs = torch.randn(SHAPE, generator=data), torch.randn((2, *SHAPE), generator=data)
    first = dpm.timesteps[0].item()
    torch.testing.assert_close(dpm.step(model_outputs[0], first, x), ddim.step(model_outputs[0], first, x))
    second = dpm.timesteps[1].item()
    assert not torch.allclose(dpm.step(model_outputs[1], second, x), ddim.step(model_outputs[1], second, x), atol=1e-3)


def test_loop_with_oracle_recovers_x0_and_a_reused_sampler_restarts():
    schedule = NoiseSchedule(**BETAS["scaled_linear"], prediction_type="v_prediction")
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    sampler = SamplerConfig(kind="dpm++", steps=20, spacing="leading", clip_sample=False).build(schedule)
    first = sample_loop(oracle(schedule, x0), sampler, SHAPE, generator=torch.Generator().manual_seed(4),
                        progress=False)
    torch.testing.assert_close(first, x0, rtol=1e-4, atol=1e-4)
    again = sample_loop(oracle(schedule, x0), sampler, SHAPE, generator=torch.Generator().manual_seed(4),
                        progress=False)
    assert torch.equal(first, again)  # the second loop's first step does not use the first loop's last x0


def test_solver_timesteps_skip_zero_and_stay_distinct():
    assert solver_timesteps(1000, 4, "leading", 1).tolist() == [801, 601, 401, 201]
    assert solver_timesteps(1000, 4, "linspace").tolist() == [999, 749, 500, 250]
    assert solver_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="do not give distinct timesteps"):
        solver_timesteps(100, 100, "leading")


def test_a_step_count_the_spacing_cannot_take_is_one_user_error_line():
    with pytest.raises(UserError, match="^100 steps with leading spacing and steps_offset 0 do not give distinct"):
        SamplerConfig(kind="dpm++", steps=100, spacing="leading").build(NoiseSchedule(num_train_timesteps=100))
    with pytest.raises(UserError, match="eta must be >= 0 and is a DDIM option, got 0.5 with dpm\\+\\+"):
        SamplerConfig(kind="dpm++", eta=0.5).build(NoiseSchedule())
