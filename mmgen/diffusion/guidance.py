"""Guidance as wrappers around a model_fn(x_t, t): classifier-free guidance and CLIP guidance (GLIDE, Nichol et al.
2022), and the conditioning interface that defines, once per model, the null condition classifier-free guidance needs.

Samplers never see a network: they get a model_fn, and a guided model_fn is just another one.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..clip.preprocess import clip_input
from ..errors import UserError
from .samplers import ModelFn
from .schedule import NoiseSchedule

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # x0 estimate (batch, C, H, W) in [-1, 1] -> score (batch,)


class ConditionalModel:
    """The conditioning interface of the conditioned diffusion models (TextToImage, DiffusionPrior, UnCLIPDecoder).

    Such a model is called as forward(x_t, t, *inputs) on raw condition inputs (CLIP tokens; for the decoder, image
    embeddings and tokens); `encode_condition(*inputs)` turns them into the condition `denoise(x_t, t, condition)`
    reads. `null_inputs` is the one definition of the unconditional input: classifier-free guidance's null condition
    is its encoding, and training's condition dropout substitutes its rows, so both use the very same input.
    A subclass defines `encode_condition`, `null_inputs` and `denoise`.
    """

    def encode_condition(self, *inputs) -> Any:
        """The condition `denoise` reads, from the model's raw condition inputs (batch first)."""
        raise NotImplementedError

    def null_inputs(self, batch_size: int, device: str | torch.device = "cpu") -> tuple:
        """The raw inputs of the unconditional model for `batch_size` samples (None for an input the model lacks)."""
        raise NotImplementedError

    def null_condition(self, batch_size: int, device: str | torch.device = "cpu") -> Any:
        """Classifier-free guidance's unconditional condition for `batch_size` samples: the encoded null inputs."""
        return self.encode_condition(*self.null_inputs(batch_size, device))

    def drop_condition(self, inputs: tuple, masks: tuple) -> tuple:
        """Training's condition dropout: in each input, the rows where its mask (batch,) is True are replaced by the
        null input's (torch.where); an input with a None mask, or None itself, is kept."""
        dropped = []
        for value, mask, null in zip(inputs, masks, self.null_inputs(1), strict=True):
            if value is not None and mask is not None:
                null = null.to(device=value.device, dtype=value.dtype)  # (1, ...)
                value = torch.where(mask.view(-1, *[1] * (value.ndim - 1)), null, value)
            dropped.append(value)
        return tuple(dropped)


class Conditioned:
    """model_fn(x_t, t) = denoise(x_t, t, condition); CFG runs two of them over one `denoise` as a single batch."""

    def __init__(self, denoise: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], condition: Any):
        self.denoise = denoise
        self.condition = condition

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoise(x_t, t, self.condition)


def _concat(first: Any, second: Any) -> Any:
    """Concatenate two conditions along the batch: tensors, (named) tuples of them, or None."""
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, tuple):
        parts = [_concat(a, b) for a, b in zip(first, second)]
        return type(first)(*parts) if hasattr(first, "_fields") else tuple(parts)
    raise TypeError(f"cannot batch conditions of type {type(first).__name__}")


def classifier_free_guidance(model_fn_cond: ModelFn, model_fn_uncond: ModelFn, guidance_scale: float, *,
                             interval: tuple[int, int] | None = None, rescale: float = 0.0) -> ModelFn:
    """model_fn giving uncond + guidance_scale * (cond - uncond) (Ho & Salimans 2022); scale 1 is the conditional model.

    The combination has weights summing to one, so it is the same in epsilon, x0 or v space. When both model_fns are
    `Conditioned` on the same `denoise`, each step runs the two passes as one batch of twice the size.

    `interval` (t_low, t_high): guide only at timesteps t_low <= t <= t_high, elsewhere the conditional model alone
    (guidance in a limited interval, Kynkäänniemi et al. 2024); steps outside it skip the unconditional pass. For the
    small shapes model, guiding only at low noise (t <= 400 of 1000) kept guidance 3 usable while guiding at high
    noise lost the prompts' colours (docs/benchmarks.md). `rescale` (0..1, diffusers'
    `guidance_rescale`, Lin et al. 2024 sec. 3.4) mixes in the guided output rescaled to the conditional output's
    per-sample standard deviation, against over-saturation.
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must not be negative, got {guidance_scale}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")
    if interval is not None and not 0 <= interval[0] <= interval[1]:
        raise ValueError(f"guidance interval must be (t_low, t_high) with 0 <= t_low <= t_high, got {interval}")
    if guidance_scale == 1:
        return model_fn_cond
    batched = (isinstance(model_fn_cond, Conditioned) and isinstance(model_fn_uncond, Conditioned)
               and model_fn_cond.denoise == model_fn_uncond.denoise)

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inside = None
        if interval is not None:
            t_batch = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
            inside = (t_batch >= interval[0]) & (t_batch <= interval[1])
            if not inside.any():  # a step outside the interval: the conditional pass alone, no unconditional one
                return model_fn_cond(x_t, t)
        if batched:
            condition = _concat(model_fn_cond.condition, model_fn_uncond.condition)
            both = model_fn_cond.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), condition)  # (2 * batch, ...)
            cond, uncond = both.chunk(2)
        else:
            cond, uncond = model_fn_cond(x_t, t), model_fn_uncond(x_t, t)
        output = uncond + guidance_scale * (cond - uncond)
        if rescale > 0:
            dims = tuple(range(1, output.ndim))
            rescaled = output * (cond.std(dim=dims, keepdim=True) / output.std(dim=dims, keepdim=True))
            output = rescale * rescaled + (1 - rescale) * output
        if inside is not None:
            output = torch.where(inside.view(-1, *[1] * (output.ndim - 1)), output, cond)
        return output

    return guided


def guided_model_fn(model: ConditionalModel, inputs: tuple, guidance_scale: float,
                    negative_inputs: tuple | None = None, **options) -> ModelFn:
    """model_fn(x_t, t) of `model` conditioned on its raw `inputs`, with classifier-free guidance unless
    guidance_scale is 1: against its null condition, or against the condition of `negative_inputs` (a negative
    prompt: guidance then pushes away from it). `options` (interval, rescale) are classifier_free_guidance's."""
    model_fn = Conditioned(model.denoise, model.encode_condition(*inputs))
    if guidance_scale == 1:
        return model_fn
    if negative_inputs is None:
        unconditional = model.null_condition(len(inputs[0]), inputs[0].device)
    else:
        unconditional = model.encode_condition(*negative_inputs)
    return classifier_free_guidance(model_fn, Conditioned(model.denoise, unconditional), guidance_scale, **options)


def clip_guidance(model_fn: ModelFn, schedule: NoiseSchedule, score_fn: ScoreFn, guidance_scale: float) -> ModelFn:
    """model_fn whose epsilon is pushed up the gradient of score_fn(x0 estimate) (classifier guidance with CLIP).

    With x0_hat(x_t) the schedule's x0 prediction from the model's output (the gradient flows through the network):
        epsilon' = epsilon - guidance_scale * sqrt(1 - alpha_bar_t) * d score_fn(x0_hat(x_t)) / d x_t
    (Dhariwal & Nichol 2021, eq. 14, with log p(y | x_t) replaced by the score), returned in the schedule's
    prediction type. Every sampler then moves its mean and its x0 towards a higher score.
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must not be negative, got {guidance_scale}")

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            output = model_fn(x, t)
            score = score_fn(schedule.predict_x0(output, x, t)).sum()  # samples are independent: one backward
            (gradient,) = torch.autograd.grad(score, x)
        output = output.detach()
        alpha_bar = schedule.alpha_cumprod_at(t, x_t)
        epsilon = schedule.predict_epsilon(output, x_t, t) - guidance_scale * (1 - alpha_bar) ** 0.5 * gradient
        x0 = (x_t - (1 - alpha_bar) ** 0.5 * epsilon) / alpha_bar**0.5
        return schedule.target(x0, epsilon, t)  # epsilon, x0 or v, whichever the sampler expects

    return guided


def check_clip_sampling_values(clip_guidance_scale: float | None = None, clip_guidance_views: int | None = None,
                               clip_rerank: int | None = None) -> None:
    """ValueError for CLIP sampling values that cannot be used (None: not given, not checked): a CLIP guidance scale
    that is not a finite number >= 0, views or rerank candidates that are not an integer >= 1."""
    if clip_guidance_scale is not None and not (math.isfinite(clip_guidance_scale) and clip_guidance_scale >= 0):
        raise ValueError(f"clip_guidance_scale must be a finite number >= 0, got {clip_guidance_scale}")
    for name, value in (("clip_guidance_views", clip_guidance_views), ("clip_rerank", clip_rerank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def clip_score(clip, text_embeddings: torch.Tensor, views: int = 1,
               generator: torch.Generator | None = None) -> ScoreFn:
    """score(x0) = CLIP's logit logit_scale * cos(image embedding, text embedding), per sample.

    x0 (batch, 3, H, W) in [-1, 1] is resized to the CLIP's image size and CLIP-normalised; text_embeddings
    (batch, embed_dim) are unit-length embeddings from `clip.encode_text`. views > 1: the mean logit over that many
    copies of x0 shifted by up to 1/16 of its size (`shifted_views`, drawn from `generator` at each call), so that
    guidance follows what CLIP sees in the picture rather than in a few of its pixels (the augmentations of CLIP-guided
    diffusion); measured in docs/benchmarks.md (the quickstart).
    """
    if clip.config.vision is None:
        raise UserError("CLIP guidance needs a CLIP with an image tower; this one is a text encoder alone")
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise UserError(f"CLIP guidance views must be an integer >= 1, got {views!r}")
    size = clip.config.vision.image_size
    text = text_embeddings.repeat(views, 1)  # view-major, as shifted_views stacks the copies

    def score(x0: torch.Tensor) -> torch.Tensor:
        images = shifted_views(x0, views, generator) if views > 1 else x0
        image_embeddings = clip.encode_image(clip_input(images, size))
        logits = clip.logit_scale_exp() * (image_embeddings * text.to(image_embeddings.dtype)).sum(dim=-1)
        return logits.view(views, -1).mean(dim=0)

    return score


def shifted_views(images: torch.Tensor, views: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(views * batch, C, H, W): `views` copies of the batch, each translated by a random offset of up to 1/16 of the
    image's height / width (at least one pixel) in each direction, the border pixels repeated into the gap."""
    height, width = images.shape[-2:]
    shift_y, shift_x = max(1, height // 16), max(1, width // 16)
    padded = torch.nn.functional.pad(images, (shift_x, shift_x, shift_y, shift_y), mode="replicate")
    offsets_y = torch.randint(0, 2 * shift_y + 1, (views,), generator=generator).tolist()
    offsets_x = torch.randint(0, 2 * shift_x + 1, (views,), generator=generator).tolist()
    return torch.cat([padded[..., y : y + height, x : x + width] for y, x in zip(offsets_y, offsets_x)])
