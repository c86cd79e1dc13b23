"""DDPM and DDIM samplers step for step against diffusers' DDPMScheduler / DDIMScheduler, and the sampling loop."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from mmgen.diffusion import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    SamplerConfig,
    inference_timesteps,
    sample_loop,
)
from mmgen.errors import UserError

SHAPE = (2, 3, 8, 8)
BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]
# how the x0 prediction is post-processed; thresholding with sample_max_value > 1 so it differs from clipping
X0_PROCESSING = {
    "none": dict(clip_sample=False),
    "clip": dict(clip_sample=True, clip_sample_range=1.5),
    "threshold": dict(clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
}
# (timestep_spacing, num_inference_steps, steps_offset); 13 does not divide 1000
SPACINGS = [("leading", 10, 0), ("leading", 13, 1), ("trailing", 10, 0), ("trailing", 13, 0), ("linspace", 13, 0)]


def make_pair(sampler_class, reference_class, beta_schedule, prediction_type, processing, spacing, **options):
    """The same sampler built twice: mmgen's and diffusers', with set_timesteps already called."""
    name, steps, offset = spacing
    schedule = NoiseSchedule(beta_schedule=beta_schedule, prediction_type=prediction_type)
    processing = X0_PROCESSING[processing]
    sampler = sampler_class(schedule, timestep_spacing=name, steps_offset=offset, **processing, **options)
    reference = reference_class(
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        timestep_spacing=name,
        steps_offset=offset,
        **processing,
        **options,
    )
    sampler.set_timesteps(steps)
    reference.set_timesteps(steps)
    return sampler, reference


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def spacing_id(spacing):
    name, steps, offset = spacing
    return f"{name}-{steps}" + (f"-offset{offset}" if offset else "")


def check_ddpm(variance_type, beta_schedule, prediction_type, processing, spacing):
    """Run mmgen's and diffusers' DDPM side by side on the same inputs and noise; every step must agree."""
    sampler, reference = make_pair(
        DDPMSampler, DDPMScheduler, beta_schedule, prediction_type, processing, spacing, variance_type=variance_type
    )
    assert torch.equal(sampler.timesteps, reference.timesteps)
    data = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=data)
    expected = x.clone()
    ours_noise, reference_noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    last = sampler.timesteps[-1].item()
    for t in sampler.timesteps.tolist():
        model_output = torch.randn(SHAPE, generator=data)
        x = sampler.step(model_output, t, x, generator=ours_noise)
        out = reference.step(model_output, t, expected, generator=reference_noise)
        # diffusers adds noise on the last step whenever t > 0; its noiseless mean there is x0 itself
        expected = out.pred_original_sample if t == last and t > 0 else out.prev_sample
        assert_close(x, expected)


def check_ddim(eta, beta_schedule, prediction_type, processing, spacing, use_clipped_model_output=True):
    """Run mmgen's and diffusers' DDIM side by side on the same inputs and noise; every step must agree."""
    alpha_to_one = spacing[2] == 0  # the offset schedule also takes Stable Diffusion's alpha_bar_0 ending
    sampler, reference = make_pair(
        DDIMSampler, DDIMScheduler, beta_schedule, prediction_type, processing, spacing, set_alpha_to_one=alpha_to_one
    )
    sampler.eta = eta
    sampler.use_clipped_model_output = use_clipped_model_output
    clipped = use_clipped_model_output and (sampler.clip_sample or sampler.thresholding)
    assert torch.equal(sampler.timesteps, reference.timesteps)
    data = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=data)
    expected = x.clone()
    visited = sampler.timesteps.tolist()
    patched = 0
    for t, prev in zip(visited, visited[1:] + [-1]):
        model_output, noise = torch.randn(SHAPE, generator=data), torch.randn(SHAPE, generator=data)
        x = sampler.step(model_output, t, x, noise=noise)
        expected, was_patched = reference_ddim_step(reference, model_output, t, expected, prev, eta, noise, clipped)
        patched += was_patched
        assert_close(x, expected)
    name, steps, _ = spacing
    assert (patched > 0) == (name == "linspace" or (name == "trailing" and 1000 % steps != 0))


# the x0 formulas: every beta schedule x prediction type x clipping, on a schedule that does not divide 1000
@pytest.mark.parametrize("processing", list(X0_PROCESSING))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddpm_matches_diffusers_per_prediction(beta_schedule, prediction_type, processing):
    check_ddpm("fixed_small", beta_schedule, prediction_type, processing, ("trailing", 13, 0))


# the timestep bookkeeping and the noise: every spacing x variance type
@pytest.mark.parametrize("spacing", SPACINGS, ids=spacing_id)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_matches_diffusers_per_spacing(variance_type, spacing):
    check_ddpm(variance_type, "squaredcos_cap_v2", "v_prediction", "clip", spacing)


@pytest.mark.parametrize("processing", list(X0_PROCESSING))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddim_matches_diffusers_per_prediction(beta_schedule, prediction_type, processing):
    check_ddim(0.5, beta_schedule, prediction_type, processing, ("linspace", 13, 0))


@pytest.mark.parametrize("spacing", SPACINGS, ids=spacing_id)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers_per_spacing(eta, spacing):
    check_ddim(eta, "scaled_linear", "epsilon", "threshold", spacing)


def reference_ddim_step(reference, model_output, t, x, prev, eta, noise, clipped=False):
    """diffusers' DDIM step from t to `prev`, and whether the reference had to be patched to get there.

    diffusers reads alpha_bar_prev at t - 1000 // steps, not at the schedule's next timestep (diffusers issue
    #12633: they differ for linspace and non-dividing trailing spacing); there, that entry is set to alpha_bar[prev].
    """
    stride = reference.config.num_train_timesteps // reference.num_inference_steps
    step = lambda: reference.step(model_output, t, x, eta=eta, variance_noise=noise if eta > 0 else None,
                                  use_clipped_model_output=clipped).prev_sample
    if t - stride == prev or (t - stride < 0 and prev < 0):
        return step(), False
    alphas_cumprod, final_alpha_cumprod = reference.alphas_cumprod, reference.final_alpha_cumprod
    wanted = alphas_cumprod[prev] if prev >= 0 else final_alpha_cumprod
    if t - stride >= 0:
        reference.alphas_cumprod = alphas_cumprod.clone()
        reference.alphas_cumprod[t - stride] = wanted
    else:
        reference.final_alpha_cumprod = wanted
    try:
        return step(), True
    finally:
        reference.alphas_cumprod, reference.final_alpha_cumprod = alphas_cumprod, final_alpha_cumprod


def test_inference_timesteps_spacings():
    assert inference_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert inference_timesteps(1000, 10, "leading", steps_offset=1).tolist() == list(range(901, 0, -100))
    assert inference_timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    assert inference_timesteps(10, 4, "linspace").tolist() == [9, 6, 3, 0]


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_step_count_out_of_range_is_a_clear_error(steps):
    sampler = DDIMSampler(NoiseSchedule())
    with pytest.raises(ValueError, match=r"num_inference_steps must be between 1 and num_train_timesteps \(1000\)"):
        sampler.set_timesteps(steps)


def test_sampler_misuse_is_a_clear_error():
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="steps_offset"):
        DDPMSampler(schedule, steps_offset=1).set_timesteps(1000)
    with pytest.raises(ValueError, match="clip_sample or thresholding"):
        DDPMSampler(schedule, clip_sample=True, thresholding=True)
    with pytest.raises(ValueError, match="variance_type"):
        DDPMSampler(schedule, variance_type="learned")
    sampler = DDIMSampler(schedule)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        sampler.step(x, 999, x)
    sampler.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of the sampler's timesteps"):
        sampler.step(x, 999, x)


def test_explicit_noise_equals_generator_noise():
    sampler = DDPMSampler(NoiseSchedule(), variance_type="fixed_large")
    sampler.set_timesteps(10)
    model_output, x = torch.randn(SHAPE), torch.randn(SHAPE)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    from_generator = sampler.step(model_output, 500, x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sampler.step(model_output, 500, x, noise=noise), from_generator)
    assert not torch.allclose(sampler.step(model_output, 500, x, noise=-noise), from_generator)


def oracle(schedule, x0):
    """A perfect network for data that is always x0: its output for the schedule's prediction type."""

    def model_fn(x_t, t):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
        alpha_bar = schedule.alpha_cumprod_at(t, x_t)
        noise = (x_t - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5
        return schedule.target(x0, noise, t)

    return model_fn


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_loop_with_oracle_recovers_x0(prediction_type):
    sd_betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = NoiseSchedule(**sd_betas, prediction_type=prediction_type)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    sampler = DDIMSampler(schedule)
    seen = []

    def model_fn(x_t, t):
        seen.append(t[0].item())
        return oracle(schedule, x0)(x_t, t)

    generator = torch.Generator().manual_seed(4)
    sample = sample_loop(model_fn, sampler, SHAPE, num_inference_steps=20, generator=generator, progress=False)
    assert seen == sampler.timesteps.tolist()
    torch.testing.assert_close(sample, x0, rtol=1e-4, atol=1e-4)


def test_ddpm_loop_with_oracle_ends_exactly_on_x0():
    # fixed_large with trailing spacing: the last step (t = 99) must land on x0 without adding noise
    schedule = NoiseSchedule(prediction_type="sample")
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    sampler = DDPMSampler(schedule, variance_type="fixed_large", timestep_spacing="trailing")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    sample = sample_loop(oracle(schedule, x0), sampler, SHAPE, num_inference_steps=10, x_T=x_T, progress=False)
    assert sampler.timesteps[-1] == 99
    torch.testing.assert_close(sample, x0)


def test_sample_loop_checks_x_T_shape():
    with pytest.raises(ValueError, match="x_T has shape"):
        sample_loop(lambda x, t: x, DDIMSampler(NoiseSchedule()), SHAPE, num_inference_steps=5, x_T=torch.randn(1, 3))


def test_sampler_config_builds_each_kind_as_configured():
    schedule = NoiseSchedule(num_train_timesteps=100)
    ddim = SamplerConfig(steps=7, eta=0.5).build(schedule, sample_range=4.0)
    assert type(ddim) is DDIMSampler and ddim.eta == 0.5 and ddim.clip_sample and ddim.clip_sample_range == 4.0
    assert ddim.timesteps.tolist() == inference_timesteps(100, 7, "trailing").tolist()
    ddpm = SamplerConfig(kind="ddpm", steps=5, spacing="leading", clip_sample=False).build(schedule)
    assert type(ddpm) is DDPMSampler and not ddpm.clip_sample and ddpm.timestep_spacing == "leading"
    assert ddpm.timesteps.tolist() == [80, 60, 40, 20, 0]
    assert SamplerConfig(clip_sample_range=1.5).build(schedule, sample_range=4.0).clip_sample_range == 1.5
    assert set(SAMPLERS) == {"ddim", "ddpm", "dpm++"}
    assert all(SAMPLERS[kind].takes_eta == (kind == "ddim") for kind in SAMPLERS)


def test_sampler_config_override_keeps_what_is_not_given():
    config = SamplerConfig(steps=64, clip_sample=False)
    assert config.override(kind=None, steps=None, eta=None) == config
    assert config.override(kind="ddpm", steps=3) == SamplerConfig(kind="ddpm", steps=3, clip_sample=False)


def test_a_built_sampler_samples_without_a_step_count():
    schedule = NoiseSchedule(num_train_timesteps=50, prediction_type="sample")
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    config = SamplerConfig(kind="ddpm", steps=6)
    built = sample_loop(oracle(schedule, x0), config.build(schedule), SHAPE, progress=False,
                        generator=torch.Generator().manual_seed(0))
    by_hand = DDPMSampler(schedule, clip_sample=True, timestep_spacing="trailing")
    expected = sample_loop(oracle(schedule, x0), by_hand, SHAPE, num_inference_steps=6, progress=False,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(built, expected)
    with pytest.raises(ValueError, match="set_timesteps"):
        sample_loop(oracle(schedule, x0), DDIMSampler(schedule), SHAPE, progress=False)


@pytest.mark.parametrize("options, message", [
    (dict(kind="euler"), "unknown sampler 'euler' \\(choose from ddim, ddpm, dpm\\+\\+\\)"),
    (dict(steps=0), "^steps must lie between 1 and the model's 100 training timesteps, got 0$"),
    (dict(steps=101), "^steps must lie between 1 and the model's 100 training timesteps, got 101$"),
    (dict(eta=-0.1), "^eta must be >= 0 and is a DDIM option, got -0.1 with ddim$"),
    (dict(kind="ddpm", eta=0.5), "^eta must be >= 0 and is a DDIM option, got 0.5 with ddpm$"),
    (dict(spacing="uniform"), "unknown timestep spacing 'uniform'"),
    (dict(clip_sample_range=0.0), "clip_sample_range must be positive"),
])
def test_bad_sampler_configs_are_one_line_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        SamplerConfig(**options).build(NoiseSchedule(num_train_timesteps=100))


def test_the_steps_error_names_the_stage():
    with pytest.raises(UserError, match="^prior steps must lie between 1 and the model's 100"):
        SamplerConfig(steps=0).build(NoiseSchedule(num_train_timesteps=100), label="prior ")


@pytest.mark.parametrize("processing", ["clip", "threshold"])
def test_ddim_with_the_unclipped_epsilon_matches_diffusers_default(processing):
    check_ddim(0.0, "squaredcos_cap_v2", "epsilon", processing, ("trailing", 10, 0), use_clipped_model_output=False)


def test_clipped_ddim_steps_along_the_clipped_x0():
    """With x0 clipped, DDIM's epsilon is the one that gives back x_t from the clipped x0, so x_prev lies between x_t
    and that x0; the unclipped epsilon (diffusers' default) keeps what clipping removed, the classifier-free guidance
    overshoot that made guidance above ~2 collapse (docs/benchmarks.md)."""
    schedule = NoiseSchedule(beta_schedule="squaredcos_cap_v2")
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(SHAPE, generator=generator)
    model_output = 3 * torch.randn(SHAPE, generator=generator)  # an over-guided epsilon: x0 far outside [-1, 1]
    steps = {}
    for clipped in (True, False):
        sampler = DDIMSampler(schedule, clip_sample=True, timestep_spacing="trailing", use_clipped_model_output=clipped)
        sampler.set_timesteps(10)
        t, prev = sampler.timesteps[2].item(), sampler.timesteps[3].item()
        steps[clipped] = sampler.step(model_output, t, x_t)
    alpha_bar, alpha_bar_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[prev]
    x0 = schedule.predict_x0(model_output, x_t, t).clamp(-1, 1)
    epsilon = (x_t - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5
    assert_close(steps[True], alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * epsilon)
    assert (steps[True] - steps[False]).abs().max() > 0.1
