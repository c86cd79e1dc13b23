"""The denoising loss: per-sample MSE to the schedule's target, optionally min-SNR-gamma weighted."""

from __future__ import annotations

import torch

from .schedule import NoiseSchedule


def min_snr_weights(t: torch.Tensor, schedule: NoiseSchedule, min_snr_gamma: float) -> torch.Tensor:
    """Per-sample weights (batch,) of min-SNR-gamma (Hang et al. 2023), expressed for the schedule's prediction type.

    The x0-space weight min(snr, gamma) becomes min(snr, gamma) / snr for epsilon and / (snr + 1) for v targets.
    """
    snr = schedule.snr(t)
    clipped = snr.clamp(max=min_snr_gamma)
    if schedule.prediction_type == "epsilon":
        return clipped / snr
    if schedule.prediction_type == "sample":
        return clipped
    return clipped / (snr + 1)


def diffusion_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean over the batch of each sample's MSE (in float32), weighted by min-SNR-gamma when it is given."""
    if min_snr_gamma is not None and min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
    per_sample = (model_output.float() - target.float()).square().flatten(1).mean(dim=1)  # (batch,)
    if min_snr_gamma is None:
        return per_sample.mean()
    return (min_snr_weights(t, schedule, min_snr_gamma).to(per_sample.device) * per_sample).mean()
