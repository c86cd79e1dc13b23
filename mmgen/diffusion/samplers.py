"""Reverse-process samplers (ancestral DDPM, DDIM, DPM-Solver++(2M)), the sampler as a configuration
(`SamplerConfig`, built through the `SAMPLERS` registry of kinds) and a sampling loop; they work with any network's
output.

Each sampler follows diffusers' DDPMScheduler / DDIMScheduler / DPMSolverMultistepScheduler step for step (the tests
check it), except for two diffusers quirks that are deliberately not copied:
- DDIM steps to the next timestep of its own schedule; diffusers steps to t - num_train_timesteps // steps,
  which is not the next timestep for "linspace" or non-dividing "trailing" spacing (diffusers issue #12633).
- DDPM adds no noise on the last step, which lands on x0; diffusers adds it whenever t > 0, which with
  fixed_large and "trailing" spacing leaves visible noise (std sqrt(1 - alpha_bar_99)) in the final sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import UserError
from .schedule import NoiseSchedule

TimestepSpacing = Literal["leading", "trailing", "linspace"]
SPACINGS = ("leading", "trailing", "linspace")


def inference_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: TimestepSpacing = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Descending int64 timesteps for `num_inference_steps` steps (spacings of Lin et al. 2023, Table 2)."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps ({num_train_timesteps}), "
            f"got {num_inference_steps}"
        )
    if spacing == "linspace":
        timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1]
    elif spacing == "leading":
        timesteps = np.arange(num_inference_steps)[::-1] * (num_train_timesteps // num_inference_steps) + steps_offset
    elif spacing == "trailing":
        timesteps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_inference_steps)) - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r} (expected leading, trailing or linspace)")
    if timesteps[0] >= num_train_timesteps:
        raise ValueError(
            f"steps_offset {steps_offset} puts timestep {int(timesteps[0])} past the last one "
            f"({num_train_timesteps - 1})"
        )
    return torch.from_numpy(timesteps.astype(np.int64))


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022), per sample: x0 -> clamp(x0, -s, s) / s,

    with s = quantile(|x0|, ratio) clamped to [1, max_value].
    """
    flat = x0.float().flatten(1)  # (batch, values)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value)[:, None]
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)


class Sampler:
    """What DDPM and DDIM share: the inference timesteps, each one's predecessor and the clipped x0 prediction."""

    takes_eta: ClassVar[bool] = False  # whether SamplerConfig.eta (stochasticity) means something to this kind
    takes_set_alpha_to_one: ClassVar[bool] = False  # whether SamplerConfig.set_alpha_to_one does (DDIM)
    takes_use_clipped_model_output: ClassVar[bool] = False  # and SamplerConfig.use_clipped_model_output (DDIM)

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: TimestepSpacing = "leading",
        steps_offset: int = 0,
    ):
        if clip_sample and thresholding:
            raise ValueError("choose clip_sample or thresholding, not both")
        if clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be positive, got {clip_sample_range}")
        if not 0 < dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio}")
        if sample_max_value < 1:
            raise ValueError(f"sample_max_value must be at least 1, got {sample_max_value}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r} (expected leading, trailing or linspace)")
        if steps_offset < 0:
            raise ValueError(f"steps_offset must not be negative, got {steps_offset}")
        self.schedule = schedule
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.thresholding = thresholding
        self.dynamic_thresholding_ratio = dynamic_thresholding_ratio
        self.sample_max_value = sample_max_value
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.timesteps: torch.Tensor | None = None
        self._previous: dict[int, int] = {}

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the `num_inference_steps` timesteps that sampling will visit, into `timesteps`."""
        self.timesteps = self.choose_timesteps(num_inference_steps)
        visited = self.timesteps.tolist()
        self._previous = dict(zip(visited, visited[1:] + [-1]))  # -1: the step lands on x0

    def choose_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The descending timesteps of `num_inference_steps` steps for this kind (DDPM and DDIM: inference_timesteps)."""
        return inference_timesteps(
            self.schedule.num_train_timesteps, num_inference_steps, self.timestep_spacing, self.steps_offset
        )

    def previous_timestep(self, t) -> int:
        """The timestep a step from t lands on; -1 for the last step."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step")
        if int(t) not in self._previous:
            raise ValueError(f"timestep {int(t)} is not one of the sampler's timesteps; call set_timesteps again")
        return self._previous[int(t)]

    def denoised(self, model_output: torch.Tensor, t, x_t: torch.Tensor) -> torch.Tensor:
        """The x0 prediction, thresholded or clipped as configured."""
        return self.processed_x0(self.schedule.predict_x0(model_output, x_t, t))

    def processed_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 thresholded or clipped as configured."""
        if self.thresholding:
            return dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        if self.clip_sample:
            return x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0


def _gaussian_like(x: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None) -> torch.Tensor:
    """`noise` when given, else a standard normal draw from `generator` (on its device, then moved to x's)."""
    if noise is not None:
        if noise.shape != x.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, the sample {tuple(x.shape)}")
        return noise
    return standard_normal(x.shape, generator, x.device, x.dtype)


def standard_normal(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """A standard normal draw from `generator` (made on the generator's device, then moved to `device`)."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


class DDPMSampler(Sampler):
    """Ancestral sampling of Ho et al. 2020, over any subset of the training timesteps."""

    def __init__(
        self, schedule: NoiseSchedule, variance_type: Literal["fixed_small", "fixed_large"] = "fixed_small", **options
    ):
        super().__init__(schedule, **options)
        if variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unknown variance_type {variance_type!r} (expected fixed_small or fixed_large)")
        self.variance_type = variance_type

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, generator=None, noise=None) -> torch.Tensor:
        """A draw of q(x_prev | x_t, x0 = denoised); `noise` (else a draw from `generator`) is its normal part."""
        t = int(t)
        prev = self.previous_timestep(t)
        alpha_bar = self.schedule.alphas_cumprod[t]
        alpha_bar_prev = self.schedule.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        beta_bar, beta_bar_prev = 1 - alpha_bar, 1 - alpha_bar_prev
        alpha_step = alpha_bar / alpha_bar_prev  # the alpha of the whole jump t -> prev
        beta_step = 1 - alpha_step
        x0 = self.denoised(model_output, t, x_t)
        # posterior mean, Ho et al. eq. 7
        mean = (alpha_bar_prev**0.5 * beta_step / beta_bar) * x0 + (alpha_step**0.5 * beta_bar_prev / beta_bar) * x_t
        if prev < 0:
            return mean
        # fixed_small: the posterior variance beta~; fixed_large: beta (an upper bound, Ho et al. section 3.2)
        variance = beta_step if self.variance_type == "fixed_large" else beta_bar_prev / beta_bar * beta_step
        return mean + variance**0.5 * _gaussian_like(x_t, generator, noise)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021): deterministic for eta = 0, as stochastic as DDPM's fixed_small for eta = 1.

    With x0 clipping or thresholding, epsilon is recomputed from the processed x0 (`use_clipped_model_output`, on by
    default as in OpenAI's guided-diffusion; diffusers' default is off), so the step stays on the line between x_t
    and the x0 it keeps."""

    takes_eta = True
    takes_set_alpha_to_one = True
    takes_use_clipped_model_output = True

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0, set_alpha_to_one: bool = True,
                 use_clipped_model_output: bool = True, **options):
        super().__init__(schedule, **options)
        if eta < 0:
            raise ValueError(f"eta must not be negative, got {eta}")
        self.eta = eta
        self.use_clipped_model_output = use_clipped_model_output
        # alpha_bar after the last step: exactly 1 (a clean x0) or that of timestep 0 (Stable Diffusion's choice)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else schedule.alphas_cumprod[0]

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, generator=None, noise=None) -> torch.Tensor:
        """x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma * noise (when eta > 0)."""
        t = int(t)
        prev = self.previous_timestep(t)
        alpha_bar = self.schedule.alphas_cumprod[t]
        alpha_bar_prev = self.schedule.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        x0 = self.denoised(model_output, t, x_t)
        if self.use_clipped_model_output and (self.clip_sample or self.thresholding):
            # the epsilon that, with the clipped x0, gives back x_t (guided-diffusion's DDIM; diffusers'
            # use_clipped_model_output=True). The unclipped epsilon would carry what clipping removed from x0 into
            # x_prev: under classifier-free guidance that overshoot piles up step after step, and prompt fidelity
            # collapses past guidance ~2 (docs/benchmarks.md, "Why guidance collapsed").
            epsilon = (x_t - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5
        else:
            epsilon = self.schedule.predict_epsilon(model_output, x_t, t)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
        sigma = self.eta * variance**0.5
        x_prev = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev - sigma**2) ** 0.5 * epsilon
        if self.eta > 0:
            x_prev = x_prev + sigma * _gaussian_like(x_t, generator, noise)
        return x_prev


def solver_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: TimestepSpacing = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Descending int64 timesteps where DPM-Solver evaluates the network, as diffusers' DPMSolverMultistepScheduler
    chooses them: the solver's last step lands on the clean sample (sigma 0) by itself, so "leading" and "linspace"
    split the range into num_inference_steps + 1 parts and skip the lowest point (no evaluation wasted near t = 0);
    "trailing" is inference_timesteps' own."""
    if spacing == "trailing":
        return inference_timesteps(num_train_timesteps, num_inference_steps, spacing)
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps ({num_train_timesteps}), "
            f"got {num_inference_steps}"
        )
    if spacing == "linspace":
        timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        timesteps = np.arange(num_inference_steps, 0, -1) * (num_train_timesteps // (num_inference_steps + 1))
        timesteps = timesteps + steps_offset
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r} (expected leading, trailing or linspace)")
    if len(np.unique(timesteps)) < len(timesteps) or timesteps[0] >= num_train_timesteps:
        raise ValueError(f"{num_inference_steps} steps with {spacing} spacing and steps_offset {steps_offset} do not "
                         f"give distinct timesteps below {num_train_timesteps}; take fewer steps or trailing spacing")
    return torch.from_numpy(timesteps.astype(np.int64))


MIN_ALPHA_CUMPROD = 2.0**-24  # float16's smallest subnormal: a zero-SNR timestep's alpha_bar for DPM-Solver


class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2): a deterministic multistep solver of the
    diffusion ODE in the data prediction x0 and the half log-SNR lambda = log(alpha / sigma), second order from the
    x0 predictions of this step and the previous one; good images in 20-25 steps where DDIM needs about 50.

    Step for step diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero"): the first step is first order (no
    previous x0 yet) and so is the last, which lands on the x0 prediction itself (sigma 0). First order is DDIM.
    """

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps (`solver_timesteps`) and forget the previous step's x0."""
        super().set_timesteps(num_inference_steps)
        self._last_step: tuple[int, torch.Tensor] | None = None  # (timestep, its x0 prediction)

    def choose_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The solver's own timesteps (see solver_timesteps)."""
        return solver_timesteps(
            self.schedule.num_train_timesteps, num_inference_steps, self.timestep_spacing, self.steps_offset
        )

    def _alpha_sigma_lambda(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and lambda_t = log(alpha_t / sigma_t), float32;
        computed through the noise-to-signal ratio sqrt((1 - alpha_bar) / alpha_bar) as diffusers does, with a
        zero-SNR last timestep's alpha_bar = 0 taken as 2**-24 (diffusers' choice: lambda stays finite)."""
        alpha_bar = self.schedule.alphas_cumprod[t]
        if alpha_bar == 0:
            alpha_bar = torch.tensor(MIN_ALPHA_CUMPROD)
        noise_to_signal = ((1 - alpha_bar) / alpha_bar) ** 0.5
        alpha = 1 / (noise_to_signal**2 + 1) ** 0.5
        sigma = noise_to_signal * alpha
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, generator=None, noise=None) -> torch.Tensor:
        """One solver step from t to the next timestep (the x0 prediction itself after the last timestep)."""
        t = int(t)
        prev = self.previous_timestep(t)
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(t)
        x0 = self.processed_x0(self._predict_x0(model_output.float(), x_t.float(), alpha_s, sigma_s))
        last, self._last_step = self._last_step, (t, x0)
        if prev < 0:
            return x0
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(prev)
        h = lambda_t - lambda_s
        direction = x0  # first order (DDIM): x0 held constant over the step
        if last is not None and self.previous_timestep(last[0]) == t:
            h_last = lambda_s - self._alpha_sigma_lambda(last[0])[2]
            direction = x0 + 0.5 * (h / h_last) * (x0 - last[1])  # x0 extrapolated to the middle of the step
        return (sigma_t / sigma_s) * x_t.float() - (alpha_t * (torch.exp(-h) - 1.0)) * direction

    def _predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
                    ) -> torch.Tensor:
        """The x0 the network's output implies, from the step's own alpha and sigma (see _alpha_sigma_lambda)."""
        if self.schedule.prediction_type == "epsilon":
            return (x_t - sigma * model_output) / alpha
        if self.schedule.prediction_type == "sample":
            return model_output
        return alpha * x_t - sigma * model_output


# the sampler kinds SamplerConfig.kind names; a new sampler is a Sampler subclass and an entry here
SAMPLERS: dict[str, type[Sampler]] = {"ddim": DDIMSampler, "ddpm": DDPMSampler, "dpm++": DPMSolverSampler}


def check_sampling_defaults(guidance_scale: float | None, sampler: str, sampling_steps: int,
                            guidance_interval: list[int] | None = None) -> None:
    """ValueError for a model's stored sampling defaults that cannot be used: a guidance scale that is not a finite
    number >= 0 (or None), a sampler kind not in SAMPLERS, a step count that is not an integer >= 1, a guidance
    interval that is not [t_low, t_high] with 0 <= t_low <= t_high (or None)."""
    check_guidance_interval(guidance_interval)
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0 or null, got {guidance_scale}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if isinstance(sampling_steps, bool) or not isinstance(sampling_steps, int) or sampling_steps < 1:
        raise ValueError(f"sampling_steps must be an integer >= 1, got {sampling_steps!r}")


def check_guidance_interval(interval) -> None:
    """ValueError unless `interval` is None or [t_low, t_high], integers with 0 <= t_low <= t_high."""
    if interval is None:
        return
    if (not isinstance(interval, (list, tuple)) or len(interval) != 2
            or any(isinstance(t, bool) or not isinstance(t, int) for t in interval)
            or not 0 <= interval[0] <= interval[1]):
        raise ValueError(f"guidance_interval must be [t_low, t_high], integers with 0 <= t_low <= t_high, or null; "
                         f"got {interval!r}")


def checked_interval(interval) -> tuple[int, int] | None:
    """A pipeline's guidance interval as a (t_low, t_high) tuple (None stays None); one UserError line if malformed."""
    try:
        check_guidance_interval(None if interval is None else list(interval))
    except (ValueError, TypeError) as error:
        raise UserError(str(error)) from None
    return None if interval is None else tuple(interval)


@dataclass(frozen=True)
class SamplerConfig:
    """A sampler as a configuration: `build(schedule)` makes the Sampler of kind `kind` for a model's schedule, its
    `steps` timesteps set. Every pipeline samples through one, so kinds, steps and eta are checked in one place.

    "trailing" spacing starts at the last training timestep (pure noise) however few the steps; steps_offset shifts
    "leading" timesteps up (Stable Diffusion's schedulers say 1). x0 estimates are clipped to clip_sample_range, by
    default the model's sample range ([-1, 1] for pixels, wider for VAE latents). set_alpha_to_one False: DDIM's last
    step lands on timestep 0's alpha_bar instead of a clean x0 (Stable Diffusion's schedulers); DDPM and DPM-Solver++
    always land on x0.

    thresholding: Imagen's dynamic thresholding of x0 (`dynamic_threshold`, with dynamic_thresholding_ratio and
    sample_max_value) instead of clipping; with clip_sample also on, thresholding wins, as in diffusers' schedulers.
    use_clipped_model_output (DDIM's): epsilon recomputed from the clipped or thresholded x0 (mmgen's default); False
    keeps the network's epsilon, as StableDiffusionPipeline steps diffusers' DDIMScheduler.
    """

    kind: str = "ddim"
    steps: int = 50
    spacing: TimestepSpacing = "trailing"
    steps_offset: int = 0
    eta: float = 0.0  # the stochasticity of the kinds that take it (DDIM; 0: deterministic)
    clip_sample: bool = True
    clip_sample_range: float | None = None  # None: `sample_range` given to build
    set_alpha_to_one: bool = True
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    use_clipped_model_output: bool = True

    def override(self, **changes) -> "SamplerConfig":
        """A copy with the fields of `changes` that are not None (a pipeline's call options over its config)."""
        return replace(self, **{name: value for name, value in changes.items() if value is not None})

    def check(self, num_train_timesteps: int, label: str = "") -> None:
        """One UserError line for options a model with `num_train_timesteps` cannot take (`label` prefixes the
        steps' name: "prior ")."""
        if self.kind not in SAMPLERS:
            raise UserError(f"unknown sampler {self.kind!r} (choose from {', '.join(SAMPLERS)})")
        if not 1 <= self.steps <= num_train_timesteps:
            raise UserError(f"{label}steps must lie between 1 and the model's {num_train_timesteps} training "
                            f"timesteps, got {self.steps}")
        if self.eta < 0 or (self.eta and not SAMPLERS[self.kind].takes_eta):
            takers = " or ".join(kind.upper() for kind, sampler in SAMPLERS.items() if sampler.takes_eta)
            raise UserError(f"eta must be >= 0 and is a {takers} option, got {self.eta} with {self.kind}")
        if self.spacing not in SPACINGS:
            raise UserError(f"unknown timestep spacing {self.spacing!r} (choose from {', '.join(SPACINGS)})")
        if self.steps_offset < 0:
            raise UserError(f"steps_offset must not be negative, got {self.steps_offset}")
        if self.clip_sample_range is not None and self.clip_sample_range <= 0:
            raise UserError(f"clip_sample_range must be positive, got {self.clip_sample_range}")
        if not 0 < self.dynamic_thresholding_ratio <= 1:
            raise UserError(f"dynamic_thresholding_ratio must lie in (0, 1], got {self.dynamic_thresholding_ratio}")
        if not (math.isfinite(self.sample_max_value) and self.sample_max_value >= 1):
            raise UserError(f"sample_max_value must be a finite number >= 1, got {self.sample_max_value}")

    def build(self, schedule: NoiseSchedule, sample_range: float = 1.0, label: str = "") -> Sampler:
        """The checked sampler for `schedule`, with its timesteps set; x0 is thresholded, else clipped to
        clip_sample_range, else to `sample_range`."""
        self.check(schedule.num_train_timesteps, label)
        clip_sample = self.clip_sample and not self.thresholding  # thresholding wins, as in diffusers' step
        options = dict(clip_sample=clip_sample, timestep_spacing=self.spacing, steps_offset=self.steps_offset)
        if clip_sample:
            options["clip_sample_range"] = sample_range if self.clip_sample_range is None else self.clip_sample_range
        if self.thresholding:
            options.update(thresholding=True, dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                           sample_max_value=self.sample_max_value)
        if SAMPLERS[self.kind].takes_eta:
            options["eta"] = self.eta
        if SAMPLERS[self.kind].takes_set_alpha_to_one:
            options["set_alpha_to_one"] = self.set_alpha_to_one
        if SAMPLERS[self.kind].takes_use_clipped_model_output:
            options["use_clipped_model_output"] = self.use_clipped_model_output
        sampler = SAMPLERS[self.kind](schedule, **options)
        try:
            sampler.set_timesteps(self.steps)
        except ValueError as error:  # a step count this kind's spacing cannot split the schedule into
            raise UserError(f"{label}{error}") from None
        return sampler


ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_loop(
    model_fn: ModelFn,
    sampler: Sampler,
    shape: tuple[int, ...],
    *,
    num_inference_steps: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    x_T: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Denoise x_T (standard normal noise of `shape` when not given) and return the sample.

    model_fn(x_t, t) gets t as an int64 tensor (batch,) on x_t's device and returns the network's output.
    num_inference_steps None: the timesteps the sampler has (a SamplerConfig's build sets them).
    """
    if num_inference_steps is not None:
        sampler.set_timesteps(num_inference_steps)
    elif sampler.timesteps is None:
        raise ValueError("give num_inference_steps, or a sampler whose set_timesteps was called")
    if x_T is None:
        x = standard_normal(shape, generator, device)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    else:
        x = x_T
    for t in tqdm(sampler.timesteps.tolist(), desc="sampling", disable=not progress, leave=False):
        model_output = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        x = sampler.step(model_output, t, x, generator=generator)
    return x
