"""Classifier-free guidance and CLIP guidance as model_fn wrappers."""

import pytest
import torch
from torch.nn import functional as F

from mmgen.clip.preprocess import CLIP_MEAN, CLIP_STD
from mmgen.diffusion import (
    Conditioned,
    DDIMSampler,
    NoiseSchedule,
    classifier_free_guidance,
    clip_guidance,
    clip_score,
    tokenize_prompts,
)
from mmgen.diffusion.guidance import shifted_views
from mmgen.errors import UserError
from tests.diffusion.helpers import tiny_text2img


@pytest.fixture(scope="module")
def model():
    return tiny_text2img()


def encodings(model, prompts):
    cond = model.encode_text(tokenize_prompts(prompts, model.context_length))
    uncond = model.encode_text(tokenize_prompts([""] * len(prompts), model.context_length))
    return cond, uncond


def noisy_input(seed=0, batch=2, size=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator), torch.tensor([37, 80])


def test_cfg_is_uncond_plus_scale_times_difference_and_batches_the_two_passes(model):
    cond, uncond = encodings(model, ["a red circle", "a small blue square at the top"])
    x, t = noisy_input()
    by_hand_cond, by_hand_uncond = model.denoise(x, t, cond), model.denoise(x, t, uncond)
    expected = by_hand_uncond + 4.0 * (by_hand_cond - by_hand_uncond)
    calls = []

    def counting_denoise(x_t, t, text):
        calls.append(len(x_t))
        return model.denoise(x_t, t, text)

    batched = classifier_free_guidance(Conditioned(counting_denoise, cond), Conditioned(counting_denoise, uncond), 4.0)
    torch.testing.assert_close(batched(x, t), expected, atol=1e-5, rtol=1e-5)
    assert calls == [4]  # one pass over cond + uncond together
    separate = classifier_free_guidance(lambda x_t, t: model.denoise(x_t, t, cond),
                                        lambda x_t, t: model.denoise(x_t, t, uncond), 4.0)
    torch.testing.assert_close(separate(x, t), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, by_hand_cond, atol=1e-3)  # the guidance does something here


def test_scale_one_is_the_conditional_model_and_zero_the_unconditional(model):
    cond, uncond = encodings(model, ["a green star", "a red circle"])
    x, t = noisy_input(1)
    cond_fn, uncond_fn = Conditioned(model.denoise, cond), Conditioned(model.denoise, uncond)
    assert torch.equal(classifier_free_guidance(cond_fn, uncond_fn, 1.0)(x, t), cond_fn(x, t))
    torch.testing.assert_close(classifier_free_guidance(cond_fn, uncond_fn, 0.0)(x, t), uncond_fn(x, t),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must not be negative"):
        classifier_free_guidance(cond_fn, uncond_fn, -1.0)


def test_guidance_rescale_equals_diffusers_rescale_noise_cfg(model):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    cond, uncond = encodings(model, ["a red circle", "a small blue square at the top"])
    x, t = noisy_input(2)
    cond_out, uncond_out = model.denoise(x, t, cond), model.denoise(x, t, uncond)
    guided = uncond_out + 3.0 * (cond_out - uncond_out)
    for rescale in (0.0, 0.7, 1.0):
        ours = classifier_free_guidance(Conditioned(model.denoise, cond), Conditioned(model.denoise, uncond), 3.0,
                                        rescale=rescale)(x, t)
        torch.testing.assert_close(ours, rescale_noise_cfg(guided, cond_out, rescale), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rescale_noise_cfg(guided, cond_out, 0.7), guided, atol=1e-4)


def test_guidance_interval_guides_only_inside_it(model):
    cond, uncond = encodings(model, ["a red circle", "a small blue square at the top"])
    x, t = noisy_input(3)  # t = 37 and 80
    cond_fn, uncond_fn = Conditioned(model.denoise, cond), Conditioned(model.denoise, uncond)
    full = classifier_free_guidance(cond_fn, uncond_fn, 3.0)(x, t)
    limited = classifier_free_guidance(cond_fn, uncond_fn, 3.0, interval=(50, 999))(x, t)
    torch.testing.assert_close(limited[0], cond_fn(x, t)[0], atol=1e-5, rtol=1e-5)  # t = 37: outside, conditional
    torch.testing.assert_close(limited[1], full[1], atol=1e-5, rtol=1e-5)  # t = 80: inside, guided
    assert not torch.allclose(full[0], limited[0], atol=1e-4)
    for bad in ({"interval": (80, 50)}, {"interval": (-1, 50)}, {"rescale": 1.5}):
        with pytest.raises(ValueError):
            classifier_free_guidance(cond_fn, uncond_fn, 3.0, **bad)


def test_clip_score_is_clip_logit_of_the_resized_normalised_image(model):
    clip = model.text_encoder
    text = clip.encode_text(tokenize_prompts(["a red circle", "a blue square"], clip.config.text.context_length))
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    images = F.interpolate(x0, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    images = ((images + 1) / 2 - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    expected = clip.logit_scale_exp() * F.cosine_similarity(clip.encode_image(images), text)
    torch.testing.assert_close(clip_score(clip, text)(x0), expected, atol=1e-5, rtol=1e-5)


def test_shifted_views_are_translations_of_up_to_a_sixteenth_with_repeated_borders():
    images = torch.randn(2, 3, 32, 48)
    views = shifted_views(images, 5, torch.Generator().manual_seed(3))
    assert views.shape == (10, 3, 32, 48)
    torch.testing.assert_close(views, shifted_views(images, 5, torch.Generator().manual_seed(3)), rtol=0, atol=0)
    padded = F.pad(images, (3, 3, 2, 2), mode="replicate")  # 48 // 16 = 3 columns, 32 // 16 = 2 rows
    offsets = set()
    for view in views.view(5, 2, 3, 32, 48):
        found = [(y, x) for y in range(5) for x in range(7) if torch.equal(padded[..., y : y + 32, x : x + 48], view)]
        assert found, "every view is one translation of the whole batch"
        offsets.add(found[0])
    assert len(offsets) > 1  # the views differ
    assert shifted_views(torch.randn(1, 3, 8, 8), 3).shape == (3, 3, 8, 8)  # small images shift by one pixel


def test_clip_score_with_views_is_the_mean_logit_over_the_shifted_views(model):
    clip = model.text_encoder
    text = clip.encode_text(tokenize_prompts(["a red circle", "a blue square"], clip.config.text.context_length))
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    views = shifted_views(x0, 4, torch.Generator().manual_seed(0))
    plain = clip_score(clip, text.repeat(4, 1))(views)
    by_views = clip_score(clip, text, views=4, generator=torch.Generator().manual_seed(0))(x0)
    torch.testing.assert_close(by_views, plain.view(4, 2).mean(dim=0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(by_views, clip_score(clip, text)(x0), atol=1e-4)
    with pytest.raises(UserError, match="views must be an integer >= 1"):
        clip_score(clip, text, views=0)


def test_clip_guided_step_raises_clip_similarity(model):
    clip = model.text_encoder
    prompts = ["a red circle", "a large blue square"]
    cond, _ = encodings(model, prompts)
    score = clip_score(clip, clip.encode_text(tokenize_prompts(prompts, clip.config.text.context_length)))
    model_fn = Conditioned(model.denoise, cond)
    sampler = DDIMSampler(model.schedule, timestep_spacing="trailing")
    sampler.set_timesteps(2)  # timesteps 99, 49: the step from 49 lands on x0
    x, _ = noisy_input(2)
    t = torch.full((2,), 49)
    with torch.no_grad():
        plain = sampler.step(model_fn(x, t), 49, x)
        guided = sampler.step(clip_guidance(model_fn, model.schedule, score, 0.5)(x, t), 49, x)
        assert (score(guided) > score(plain)).all()
        assert not torch.allclose(guided, plain)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_clip_guidance_speaks_the_schedules_prediction_type(prediction_type):
    schedule = NoiseSchedule(num_train_timesteps=100, prediction_type=prediction_type)
    x, t = noisy_input(3)
    output = torch.randn_like(x)
    gradient_direction = torch.randn_like(x)

    def score(x0):
        return (x0 * gradient_direction).flatten(1).sum(dim=1)  # d score / d x0 = gradient_direction

    def model_fn(x_t, t):
        return output + 0.0 * x_t  # constant, but differentiable in x_t like a network

    with torch.no_grad():
        unguided = clip_guidance(model_fn, schedule, score, 0.0)(x, t)
        guided = clip_guidance(model_fn, schedule, score, 2.0)(x, t)
    torch.testing.assert_close(unguided, output, atol=1e-4, rtol=1e-4)
    # the output is constant in x_t, so d score(x0_hat(x_t)) / d x_t = gradient_direction * d x0_hat / d x_t
    alpha_bar = schedule.alpha_cumprod_at(t, x)
    slope = {"epsilon": alpha_bar**-0.5, "sample": 0.0, "v_prediction": alpha_bar**0.5}[prediction_type]
    expected = schedule.predict_epsilon(output, x, t) - 2.0 * (1 - alpha_bar) ** 0.5 * slope * gradient_direction
    torch.testing.assert_close(schedule.predict_epsilon(guided, x, t), expected, atol=1e-4, rtol=1e-4)


def test_guidance_interval_skips_the_unconditional_pass_outside_it(model):
    cond, uncond = encodings(model, ["a red circle", "a small blue square at the top"])
    x, t = noisy_input(4)  # t = 37 and 80: both outside (100, 999)
    calls = []

    def counting_denoise(x_t, t, text):
        calls.append(len(x_t))
        return model.denoise(x_t, t, text)

    limited = classifier_free_guidance(Conditioned(counting_denoise, cond), Conditioned(counting_denoise, uncond), 3.0,
                                       interval=(100, 999))
    torch.testing.assert_close(limited(x, t), model.denoise(x, t, cond), atol=1e-5, rtol=1e-5)
    assert calls == [2]  # the conditional batch only


def _leaves(condition):
    """The tensors of a condition (a tensor, or nested (named) tuples of them), None kept."""
    if condition is None or isinstance(condition, torch.Tensor):
        return [condition]
    return [leaf for part in condition for leaf in _leaves(part)]


def test_training_dropout_substitutes_the_null_condition_guidance_uses(model):
    from tests.diffusion.unclip_helpers import tiny_decoder, tiny_prior

    tokens = tokenize_prompts(["a red circle", "a small blue square at the top"], model.context_length)
    embedding = F.normalize(torch.randn(2, 48), dim=-1)
    cases = [(model, (tokens,)), (tiny_prior(), (tokens,)), (tiny_decoder(), (embedding, tokens)),
             (tiny_decoder(text_conditioning=False), (embedding, None))]
    for conditioned, inputs in cases:
        masks = tuple(torch.tensor([True, False]) for _ in inputs)
        dropped = conditioned.drop_condition(inputs, masks)
        null, kept = _leaves(conditioned.null_condition(2)), _leaves(conditioned.encode_condition(*inputs))
        for leaf, null_leaf, kept_leaf in zip(_leaves(conditioned.encode_condition(*dropped)), null, kept, strict=True):
            if leaf is None:
                assert null_leaf is None and kept_leaf is None
                continue
            assert torch.equal(leaf[0], null_leaf[0]) and torch.equal(leaf[1], kept_leaf[1])
        assert not torch.equal(null[0], kept[0])  # the null condition is another input
    null_tokens = model.drop_condition((tokens,), (torch.tensor([True, True]),))[0]
    assert torch.equal(null_tokens, tokenize_prompts(["", ""], model.context_length))
    zeroed = tiny_decoder().drop_condition((embedding, tokens), (torch.tensor([True, False]), None))
    assert not zeroed[0][0].any() and torch.equal(zeroed[0][1], embedding[1]) and torch.equal(zeroed[1], tokens)
