"""The noise schedule and the diffusion loss, against diffusers and against hand computations."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from mmgen.diffusion import NoiseSchedule, diffusion_loss

SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),  # Stable Diffusion's
    dict(beta_schedule="squaredcos_cap_v2"),
]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]


@pytest.mark.parametrize("options", SCHEDULES, ids=lambda o: o["beta_schedule"])
@pytest.mark.parametrize("reference_class", [DDPMScheduler, DDIMScheduler])
def test_betas_and_alphas_cumprod_equal_diffusers(reference_class, options):
    schedule = NoiseSchedule(num_train_timesteps=1000, **options)
    reference = reference_class(num_train_timesteps=1000, **options)
    assert schedule.alphas_cumprod.dtype == torch.float32
    # computed the same way in float32, so equal bit for bit
    assert torch.equal(schedule.betas, reference.betas)
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod)


@pytest.mark.parametrize("options", SCHEDULES, ids=lambda o: o["beta_schedule"])
def test_add_noise_and_velocity_equal_diffusers(options):
    schedule, reference = NoiseSchedule(**options), DDPMScheduler(**options)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), reference.add_noise(x0, noise, t))
    torch.testing.assert_close(schedule.velocity(x0, noise, t), reference.get_velocity(x0, noise, t))


def test_add_noise_takes_a_python_int_timestep():
    schedule = NoiseSchedule()
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    alpha_bar = schedule.alphas_cumprod[250].item()
    expected = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise
    torch.testing.assert_close(schedule.add_noise(x0, noise, 250), expected)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_conversions_invert_the_target(prediction_type):
    schedule = NoiseSchedule(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)
    t = torch.tensor([5, 400, 990])
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.target(x0, noise, t)
    expected_target = {"epsilon": noise, "sample": x0, "v_prediction": schedule.velocity(x0, noise, t)}[prediction_type]
    torch.testing.assert_close(target, expected_target)
    torch.testing.assert_close(schedule.predict_x0(target, x_t, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(schedule.predict_epsilon(target, x_t, t), noise, rtol=1e-4, atol=1e-4)


def test_snr_by_hand():
    schedule = NoiseSchedule()
    t = torch.tensor([0, 300, 999])
    expected = [a / (1 - a) for a in schedule.alphas_cumprod[t].double().tolist()]
    torch.testing.assert_close(schedule.snr(t).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert schedule.snr(t).shape == (3,)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(beta_schedule="sigmoid"), "unknown beta_schedule"),
        (dict(prediction_type="noise"), "unknown prediction_type"),
        (dict(num_train_timesteps=0), "num_train_timesteps must be positive"),
        (dict(beta_start=0.03, beta_end=0.02), "beta_start <= beta_end"),
    ],
)
def test_bad_schedule_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule(**options)


def test_loss_without_weighting_is_the_mse():
    generator = torch.Generator().manual_seed(2)
    output, target = torch.randn(4, 3, 4, 4, generator=generator), torch.randn(4, 3, 4, 4, generator=generator)
    loss = diffusion_loss(output, target, torch.tensor([1, 2, 3, 4]), NoiseSchedule())
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(output, target))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weights_by_hand(prediction_type):
    schedule, gamma = NoiseSchedule(prediction_type=prediction_type), 5.0
    generator = torch.Generator().manual_seed(3)
    output, target = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)
    t = torch.tensor([10, 150, 900])  # snr ~ 500, ~ 3.3, ~ 1e-4: the clamp at gamma matters for the first only
    expected = 0.0
    for index, step in enumerate(t.tolist()):
        alpha_bar = schedule.alphas_cumprod[step].item()
        snr = alpha_bar / (1 - alpha_bar)
        clipped = min(snr, gamma)
        weight = {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1)}[prediction_type]
        expected += weight * ((output[index] - target[index]) ** 2).mean().item() / len(t)
    loss = diffusion_loss(output, target, t, schedule, min_snr_gamma=gamma)
    assert abs(loss.item() - expected) < 1e-5 * max(1.0, abs(expected))
    assert abs(loss.item() - diffusion_loss(output, target, t, schedule).item()) > 1e-3  # the weighting did something
