"""How far each deterministic sampler lands from the exact solution of the diffusion ODE, with a perfect network.

The data are a per-coordinate mixture of two Gaussians (means +-1, std 0.5), whose posterior mean E[x0 | x_t] has a
closed form, so the "network" is exact and every difference between samplers is discretisation error. Every sampler
starts from the same x_T at t = 999 ("trailing" spacing), Stable Diffusion's scaled_linear betas, epsilon
prediction, no clipping, and ends by jumping from its last timestep t_last to the x0 prediction there. The
reference does the same, but reaches t_last with DPM-Solver++ over every one of the 1000 training timesteps, so it
measures the error of the coarse steps and not the (shared) last jump. Reported: RMS distance to the reference
(`--reference ddim`: DDIM over all 1000 timesteps instead, to check the reference does not favour DPM-Solver++).

    python bench/sampler_ode_error.py
"""

from __future__ import annotations

import argparse
import json

import torch

from mmgen.diffusion import NoiseSchedule, SamplerConfig, sample_loop

MEANS, STD = torch.tensor([-1.0, 1.0]), 0.5


def exact_model_fn(schedule: NoiseSchedule):
    """The epsilon prediction of the Bayes-optimal denoiser for the two-Gaussian data (float64 inside)."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = schedule.alpha_cumprod_at(t, x_t).double()
        a, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
        x = x_t.double()[..., None]  # (..., component)
        a, sigma = a[..., None], sigma[..., None]
        variance = a**2 * STD**2 + sigma**2
        log_weight = -((x - a * MEANS.double()) ** 2) / (2 * variance)
        weight = torch.softmax(log_weight, dim=-1)
        x0 = (weight * (MEANS.double() + a * STD**2 / variance * (x - a * MEANS.double()))).sum(-1)
        return ((x_t.double() - a[..., 0] * x0) / sigma[..., 0]).float()

    return model_fn


def run(kind: str, steps: int, schedule: NoiseSchedule, x_T: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The sample of `kind` with `steps` steps from x_T, and its last timestep."""
    sampler = SamplerConfig(kind=kind, steps=steps, spacing="trailing", clip_sample=False).build(schedule)
    sample = sample_loop(exact_model_fn(schedule), sampler, tuple(x_T.shape), x_T=x_T, progress=False)
    return sample, int(sampler.timesteps[-1])


def reference(schedule: NoiseSchedule, x_T: torch.Tensor, last_timesteps: set[int], kind: str = "dpm++"
              ) -> dict[int, torch.Tensor]:
    """For each t_last: the x0 prediction at t_last of `kind` run over every training timestep down to it."""
    model_fn = exact_model_fn(schedule)
    sampler = SamplerConfig(kind=kind, steps=schedule.num_train_timesteps, spacing="trailing",
                            clip_sample=False).build(schedule)
    x, found = x_T, {}
    for t in sampler.timesteps.tolist():
        output = model_fn(x, torch.full(x.shape[:1], t))
        if t in last_timesteps:
            found[t] = schedule.predict_x0(output, x, t)
        if t <= min(last_timesteps):
            return found
        x = sampler.step(output, t, x)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32768)
    parser.add_argument("--reference", choices=("dpm++", "ddim"), default="dpm++",
                        help="the solver run over all 1000 timesteps as the reference (ddim: check it is not biased)")
    args = parser.parse_args()
    schedule = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x_T = torch.randn(args.samples, generator=torch.Generator().manual_seed(0))
    runs = {(kind, steps): run(kind, steps, schedule, x_T)
            for kind in ("ddim", "dpm++") for steps in (10, 20, 25, 50)}
    references = reference(schedule, x_T, {last for _, last in runs.values()}, args.reference)
    results = []
    for (kind, steps), (sample, last) in runs.items():
        rms = (sample - references[last]).pow(2).mean().sqrt().item()
        results.append({"sampler": kind, "steps": steps, "last_timestep": last, "rms_to_reference": rms})
        print(f"{kind:6s} {steps:3d} steps (last t {last:3d}): RMS to the reference {rms:.5f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
