"""The forward (noising) process of a DDPM: a beta schedule, q(x_t | x_0) and the prediction-type conversions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
MAX_COSINE_BETA = 0.999  # Nichol & Dhariwal clip betas so the last steps do not destroy the signal in one jump


def make_betas(
    beta_schedule: BetaSchedule, num_train_timesteps: int, beta_start: float, beta_end: float
) -> torch.Tensor:
    """The float32 betas of a named schedule, computed as diffusers does (alphas_cumprod then match bit for bit)."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        # latent diffusion's schedule: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        # cosine alpha_bar (Nichol & Dhariwal 2021), discretised in float64 before the cast
        steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=MAX_COSINE_BETA).to(torch.float32)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r} (expected linear, scaled_linear or squaredcos_cap_v2)")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last step has zero SNR (Lin et al. 2023, Algorithm 1): sqrt(alpha_bar) shifted so it ends at 0
    and scaled so it starts where it did. Computed as diffusers' function of the same name does."""
    root_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root_alpha_bar[0].clone(), root_alpha_bar[-1].clone()
    root_alpha_bar = (root_alpha_bar - last) * (first / (first - last))
    alpha_bar = root_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # undo the cumulative product
    return 1 - alphas


@dataclass(eq=False)
class NoiseSchedule:
    """A discrete DDPM noise schedule of `num_train_timesteps` steps and the network's `prediction_type`.

    Timestep arguments `t` are ints or int tensors of shape (batch,); results broadcast against x.
    `rescale_zero_terminal_snr` makes the last timestep pure noise (Lin et al. 2023: train and sample from the same
    x_T); it needs v_prediction or sample (noise cannot be predicted from pure noise), and sampling that starts at
    the last timestep: the samplers' timestep_spacing "trailing".
    """

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: PredictionType = "epsilon"
    rescale_zero_terminal_snr: bool = False

    def __post_init__(self):
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be positive, got {self.num_train_timesteps}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}")
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r} (expected epsilon, sample or v_prediction)"
            )
        if self.rescale_zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("rescale_zero_terminal_snr needs prediction_type v_prediction (or sample): at zero SNR "
                             "the noise cannot be predicted")
        self.betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        if self.rescale_zero_terminal_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        # float32 cumulative product, like diffusers: samplers checked against it stay within 1e-5
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def alpha_cumprod_at(self, t, like: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod[t] in the dtype and on the device of `like`, shaped to broadcast against it."""
        t = torch.as_tensor(t, device=like.device)
        values = self.alphas_cumprod.to(like.device)[t].to(like.dtype)
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))  # (batch, 1, ..., 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Sample of q(x_t | x_0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        alpha_bar = self.alpha_cumprod_at(t, x0)
        return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The v target (Salimans & Ho 2022): sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0."""
        alpha_bar = self.alpha_cumprod_at(t, x0)
        return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * x0

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), float32, shaped like t."""
        t = torch.as_tensor(t)
        alpha_bar = self.alphas_cumprod.to(t.device)[t]
        return alpha_bar / (1 - alpha_bar)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the network is trained to output for prediction_type: noise, x0 or v."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return self.velocity(x0, noise, t)

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The clean sample implied by the network's output at x_t."""
        alpha_bar = self.alpha_cumprod_at(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar**0.5
        if self.prediction_type == "sample":
            return model_output
        return alpha_bar**0.5 * x_t - (1 - alpha_bar) ** 0.5 * model_output

    def predict_epsilon(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The noise implied by the network's output at x_t."""
        alpha_bar = self.alpha_cumprod_at(t, x_t)
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "sample":
            return (x_t - alpha_bar**0.5 * model_output) / (1 - alpha_bar) ** 0.5
        return alpha_bar**0.5 * model_output + (1 - alpha_bar) ** 0.5 * x_t
