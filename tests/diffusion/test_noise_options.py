"""Zero-terminal-SNR schedules, offset noise and input perturbation against diffusers."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from mmgen.diffusion import DDIMSampler, DDPMSampler, NoiseSchedule
from mmgen.diffusion.objective import DenoisingLoss, DiffusionLossConfig, PriorLoss
from mmgen.diffusion.schedule import rescale_zero_terminal_snr
from mmgen.errors import ConfigError

from .test_samplers import reference_ddim_step

SHAPE = (2, 4, 8, 8)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_rescaled_schedule_matches_diffusers(beta_schedule):
    schedule = NoiseSchedule(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
                             prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    reference = DDIMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
                              rescale_betas_zero_snr=True)
    torch.testing.assert_close(schedule.betas, reference.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod, atol=1e-6, rtol=0)
    assert schedule.alphas_cumprod[-1] == 0 and schedule.snr(999) == 0  # the last step is pure noise
    plain = NoiseSchedule(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(schedule.alphas_cumprod[0], plain.alphas_cumprod[0])  # the first step kept
    betas = torch.rand(50, generator=torch.Generator().manual_seed(0)) * 0.05 + 1e-4  # any betas, not only named
    torch.testing.assert_close(rescale_zero_terminal_snr(betas), diffusers_rescale(betas.clone()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_trailing_v_prediction_sampling_from_pure_noise_matches_diffusers(eta):
    schedule = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    sampler = DDIMSampler(schedule, eta=eta, timestep_spacing="trailing")
    reference = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True,
                              timestep_spacing="trailing", clip_sample=False)
    sampler.set_timesteps(10)
    reference.set_timesteps(10)
    assert sampler.timesteps[0] == 999 and torch.equal(sampler.timesteps, reference.timesteps)
    data = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=data)
    expected = x.clone()
    visited = sampler.timesteps.tolist()
    for t, prev in zip(visited, visited[1:] + [-1]):
        model_output, noise = torch.randn(SHAPE, generator=data), torch.randn(SHAPE, generator=data)
        x = sampler.step(model_output, t, x, noise=noise)
        expected, _ = reference_ddim_step(reference, model_output, t, expected, prev, eta, noise)
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


def test_ddpm_steps_from_pure_noise_match_diffusers():
    schedule = NoiseSchedule(prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    sampler = DDPMSampler(schedule, timestep_spacing="trailing")
    reference = DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                               clip_sample=False)
    sampler.set_timesteps(10)
    reference.set_timesteps(10)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=data)
    output = torch.randn(SHAPE, generator=data)
    ours = sampler.step(output, 999, x, generator=torch.Generator().manual_seed(2))
    theirs = reference.step(output, 999, x, generator=torch.Generator().manual_seed(2)).prev_sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_epsilon_prediction_with_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="needs prediction_type v_prediction"):
        NoiseSchedule(rescale_zero_terminal_snr=True)


class Recorder(torch.nn.Module):
    """A stand-in text-to-image model: clean samples are the images, and it records what it is called with."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule, self.calls = schedule, []

    def encode_images(self, images):
        return images

    def drop_condition(self, inputs, masks):
        return inputs

    def forward(self, x_t, t, tokens):
        self.calls.append((x_t, t))
        return torch.zeros_like(x_t)


def diffusers_script_noise(latents, schedule, offset, perturbation, training):
    """train_text_to_image.py's draws (timesteps first, as mmgen draws them): the noised input and the target."""
    scheduler = DDPMScheduler(prediction_type=schedule.prediction_type)
    timesteps = torch.randint(0, 1000, (latents.shape[0],))
    noise = torch.randn_like(latents)
    if offset:
        noise += offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1))
    new_noise = noise + perturbation * torch.randn_like(noise) if perturbation and training else noise
    noisy = scheduler.add_noise(latents, new_noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps) if schedule.prediction_type == "v_prediction" else noise
    return noisy, timesteps, target


@pytest.mark.parametrize("offset, perturbation, training", [(0.1, 0.0, True), (0.0, 0.2, True), (0.1, 0.2, True),
                                                            (0.1, 0.2, False)])
def test_offset_noise_and_input_perturbation_match_diffusers_training_script(offset, perturbation, training):
    schedule = NoiseSchedule(prediction_type="v_prediction")
    model = Recorder(schedule).train(training)
    loss_fn = DenoisingLoss(model, DiffusionLossConfig(caption_dropout=0.0, offset_noise=offset,
                                                       input_perturbation=perturbation))
    images = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    loss, _ = loss_fn(model, {"images": images, "tokens": torch.zeros(SHAPE[0], 4, dtype=torch.long)})
    torch.manual_seed(5)
    if training:
        torch.rand(SHAPE[0])  # the caption-dropout draw mmgen makes first in training
    noisy, timesteps, target = diffusers_script_noise(images, schedule, offset, perturbation, training)
    x_t, t = model.calls[-1]
    assert torch.equal(t, timesteps)
    torch.testing.assert_close(x_t, noisy, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, target.square().mean(), atol=1e-6, rtol=1e-6)  # the model outputs zeros
    plain = schedule.add_noise(images, torch.randn(SHAPE), timesteps)
    assert (x_t - plain).abs().max() > 1e-3


def test_offset_noise_on_the_prior_is_a_config_error():
    with pytest.raises(ConfigError, match="offset_noise"):
        PriorLoss(Recorder(NoiseSchedule()), DiffusionLossConfig(offset_noise=0.1))


def test_logit_normal_timesteps_match_diffusers():
    """loss.timestep_sampling=logit_normal draws SD3's timesteps: diffusers' compute_density_for_timestep_sampling
    on the same RNG state, times T; uniform stays torch.randint (the draws of earlier runs)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    schedule = NoiseSchedule()
    model = type("Model", (), {"schedule": schedule})()
    loss = DenoisingLoss(model, DiffusionLossConfig(timestep_sampling="logit_normal", logit_mean=0.4, logit_std=1.3))
    torch.manual_seed(7)
    drawn = loss.timesteps(4096, torch.device("cpu"))
    u = compute_density_for_timestep_sampling("logit_normal", 4096, 0.4, 1.3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(drawn, (u * schedule.num_train_timesteps).long())
    assert 0 <= drawn.min() and drawn.max() < schedule.num_train_timesteps
    assert 550 < drawn.float().mean() < 650  # sigmoid(0.4) ~ 0.6: the middle, shifted towards noise
    uniform = DenoisingLoss(model, DiffusionLossConfig())
    torch.manual_seed(7)
    assert torch.equal(uniform.timesteps(64, torch.device("cpu")), torch.randint(0, 1000, (64,),
                                                                                 generator=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("options, message", [({"timestep_sampling": "lognormal"}, "timestep_sampling must be"),
                                              ({"timestep_sampling": "logit_normal", "logit_std": 0}, "logit_std")])
def test_bad_timestep_sampling_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DiffusionLossConfig(**options)
