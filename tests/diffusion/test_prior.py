"""The unCLIP diffusion prior: shapes, what its prediction depends on, x0 vs epsilon, sampling, its folder, and
`mmgen train prior`."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mmgen
from mmgen import cli
from mmgen.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DiffusionPrior,
    NoiseSchedule,
    PriorTransformerConfig,
    sample_loop,
    tokenize_prompts,
)
from mmgen.diffusion.prior import EXTRA_POSITIONS
from mmgen.errors import UserError
from mmgen.pipelines import PriorPipeline
from mmgen.text import GPT, GPTConfig
from tests.clip.helpers import make_clip
from tests.diffusion.unclip_helpers import TINY_PRIOR_RECIPE, TINY_TRANSFORMER, tiny_prior, write_config
from tests.test_cli import one_line_error, run_cli

PROMPTS = ["a red circle", "a small blue square at the top left"]


@pytest.fixture(scope="module")
def prior():
    return tiny_prior()


def test_shapes_scale_and_the_frozen_clip(prior):
    tokens = tokenize_prompts(PROMPTS, prior.context_length)
    x_t, t = torch.randn(2, 48), torch.tensor([3, 90])
    assert prior(x_t, t, tokens).shape == (2, 48)
    assert prior(x_t, torch.tensor(7), tokens).shape == (2, 48)  # a scalar timestep is broadcast
    images = torch.randn(2, 3, 32, 32)
    targets = prior.image_targets(images)
    # unit CLIP embeddings scaled by sqrt(embed_dim): unit variance per component, like [-1, 1] pixels
    torch.testing.assert_close(targets.norm(dim=-1), torch.full((2,), 48**0.5))
    torch.testing.assert_close(prior.to_image_embedding(targets), prior.clip.encode_image(images))
    assert not any(p.requires_grad for p in prior.clip.parameters())
    prior.train()
    assert prior.transformer.training and not prior.clip.training
    prior.eval()
    with pytest.raises(ValueError, match=r"expected x_t of shape \(batch, 48\)"):
        prior(torch.randn(2, 3, 4, 4), t, tokens)


def _sequence_states(prior, x_t, t, text) -> tuple[torch.Tensor, torch.Tensor]:
    """(the transformer's hidden states (batch, seq, width) at every position, the prediction) of one denoise call.

    denoise runs the last block for the query position alone; the full states are recomputed from the same inputs,
    and their query position must give the same prediction."""
    captured = []
    handle = prior.transformer.register_forward_hook(
        lambda module, args, kwargs, output: captured.append((args, kwargs)), with_kwargs=True)
    try:
        prediction = prior.denoise(x_t, t, text)
    finally:
        handle.remove()
    args, kwargs = captured[0]
    assert "output_positions" in kwargs
    states = prior.transformer(*args, **{key: value for key, value in kwargs.items() if key != "output_positions"})
    torch.testing.assert_close(prior.out_proj(prior.norm_out(states[:, -1])), prediction, atol=1e-5, rtol=1e-5)
    return states, prediction


def test_causal_sequence_each_position_sees_only_what_comes_before(prior):
    text = prior.encode_text(tokenize_prompts(PROMPTS, prior.context_length))
    x_t, t = torch.randn(2, 48), torch.tensor([10, 60])
    states, prediction = _sequence_states(prior, x_t, t, text)
    context = prior.context_length
    assert states.shape == (2, context + EXTRA_POSITIONS, 32)
    # positions: text tokens 0..context-1, text embedding, timestep, noised image embedding, query (last)
    image_position = context + 2
    other_states, other_prediction = _sequence_states(prior, torch.randn(2, 48), t, text)
    torch.testing.assert_close(other_states[:, :image_position], states[:, :image_position], rtol=0, atol=0)
    assert not torch.allclose(other_states[:, image_position:], states[:, image_position:])
    assert not torch.allclose(other_prediction, prediction)
    later_t_states, later_t_prediction = _sequence_states(prior, x_t, torch.tensor([50, 20]), text)
    torch.testing.assert_close(later_t_states[:, :context + 1], states[:, :context + 1], rtol=0, atol=0)
    assert not torch.allclose(later_t_prediction, prediction)
    # the text embedding and the token states both reach the query
    moved = text._replace(embedding=torch.roll(text.embedding, 1, dims=0))
    assert not torch.allclose(_sequence_states(prior, x_t, t, moved)[1], prediction)
    states_swapped = text._replace(token_states=torch.roll(text.token_states, 1, dims=0),
                                   padding_mask=torch.roll(text.padding_mask, 1, dims=0))
    assert not torch.allclose(_sequence_states(prior, x_t, t, states_swapped)[1], prediction)


def test_padding_tokens_after_end_of_text_are_never_read(prior):
    text = prior.encode_text(tokenize_prompts(PROMPTS, prior.context_length))
    assert text.padding_mask[0].any()  # "a red circle" is shorter than the context
    noisy = text._replace(token_states=torch.where(text.padding_mask[..., None], torch.randn_like(text.token_states),
                                                   text.token_states))
    x_t, t = torch.randn(2, 48), torch.tensor([10, 60])
    torch.testing.assert_close(prior.denoise(x_t, t, noisy), prior.denoise(x_t, t, text))


class OraclePrior(DiffusionPrior):
    """Predicts, for every x_t, exactly what its schedule's prediction type asks for with x0 = `target`."""

    target: torch.Tensor

    def denoise(self, x_t, t, text):
        alpha_bar = self.schedule.alpha_cumprod_at(t, x_t)
        noise = (x_t - alpha_bar**0.5 * self.target) / (1 - alpha_bar) ** 0.5
        return self.schedule.target(self.target.expand_as(x_t), noise, t)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_sampling_lands_on_the_predicted_embedding_for_every_prediction_type(prediction_type):
    oracle = OraclePrior(tiny_prior(prediction_type=prediction_type).config)
    oracle.target = torch.randn(1, 48) * 2
    for guidance_scale in (1.0, 3.0):  # both passes agree, so guidance keeps the target
        embeddings = PriorPipeline(oracle)(PROMPTS, steps=5, guidance_scale=guidance_scale, progress=False)
        assert embeddings.shape == (2, 48)
        torch.testing.assert_close(embeddings, torch.nn.functional.normalize(oracle.target, dim=-1).expand(2, 48),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler_class", [DDIMSampler, DDPMSampler])
def test_samplers_are_shape_agnostic(sampler_class):
    """A (batch, embed_dim) sample steps exactly like the same numbers shaped as (batch, embed_dim, 1, 1) images."""
    schedule = NoiseSchedule(num_train_timesteps=50, prediction_type="sample")
    target = torch.randn(3, 8)

    def model_fn(x_t, t):
        return target.reshape(x_t.shape) * 0.5 + x_t * 0.1

    flat = sample_loop(model_fn, sampler_class(schedule), (3, 8), num_inference_steps=6, progress=False,
                       generator=torch.Generator().manual_seed(0))
    images = sample_loop(model_fn, sampler_class(schedule), (3, 8, 1, 1), num_inference_steps=6, progress=False,
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images.reshape(3, 8), flat, rtol=0, atol=0)


class ZeroModel(torch.nn.Module):
    """Predicts zero and remembers the x_t and t it was given."""

    def forward(self, x_t, t, tokens):
        self.x_t, self.t = x_t, t
        return torch.zeros_like(x_t)


def _prior_loss(prior, **config):
    from mmgen.diffusion.objective import DiffusionLossConfig, PriorLoss

    return PriorLoss(prior, DiffusionLossConfig(**config))


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_the_training_target_is_the_schedules_prediction_type(prediction_type):
    prior = tiny_prior(prediction_type=prediction_type)
    images, tokens = torch.randn(8, 3, 32, 32), tokenize_prompts(PROMPTS * 4, prior.context_length)
    stub = ZeroModel().eval()
    loss, _ = _prior_loss(prior)(stub, {"images": images, "tokens": tokens})
    x0 = prior.image_targets(images)  # scaled: mean square 1 per component
    alpha_bar = prior.schedule.alpha_cumprod_at(stub.t, x0)
    noise = (stub.x_t - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5
    x0_loss, epsilon_loss = x0.square().mean(), noise.square().mean()
    torch.testing.assert_close(x0_loss, torch.tensor(1.0))
    expected, other = (x0_loss, epsilon_loss) if prediction_type == "sample" else (epsilon_loss, x0_loss)
    torch.testing.assert_close(loss, expected)
    assert abs(loss - other) > 1e-3


def test_a_few_training_steps_learn_the_clean_embedding():
    model = tiny_prior().train()
    tokens = tokenize_prompts(PROMPTS * 4, model.context_length)
    images = torch.randn(8, 3, 32, 32)
    loss_fn = _prior_loss(model, caption_dropout=0.0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = {"images": images, "tokens": tokens, "captions": PROMPTS * 4, "skipped": 0, "skipped_examples": []}
    model.eval()
    torch.manual_seed(0)  # evaluation draws its timesteps and noise from a freshly seeded RNG, as the Trainer does
    before = loss_fn(model, batch)[0].item()
    model.train()
    for _ in range(40):
        loss, _ = loss_fn(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    torch.manual_seed(0)
    assert loss_fn(model, batch)[0].item() < 0.7 * before
    # from almost pure noise the prediction is near the clean embeddings, far from x_t
    t = torch.tensor([99] * 8)
    x0 = model.image_targets(images)
    x_t = model.schedule.add_noise(x0, torch.randn(8, 48), t)
    output = model(x_t, t, tokens)
    assert (output - x0).norm() < 0.5 * (output - x_t).norm()


def test_pipeline_is_deterministic_by_seed_and_guidance_changes_it(prior):
    pipeline = PriorPipeline(prior)
    first = pipeline(PROMPTS, steps=4, seed=1, progress=False)
    assert first.shape == (2, 48)
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(2))
    assert torch.equal(pipeline(PROMPTS, steps=4, seed=1, progress=False), first)
    assert not torch.allclose(pipeline(PROMPTS, steps=4, seed=2, progress=False), first)
    assert not torch.allclose(pipeline(PROMPTS, steps=4, seed=1, guidance_scale=1.0, progress=False), first)
    for options, message in [(dict(steps=0), "prior steps must lie between 1 and the model's 100"),
                             (dict(guidance_scale=-1.0), "prior guidance scale must be >= 0"),
                             (dict(sampler="euler"), "unknown sampler 'euler'")]:
        with pytest.raises(UserError, match=message):
            pipeline(PROMPTS, progress=False, **options)


def test_save_load_round_trip_is_exact_and_self_contained(prior, tmp_path):
    prior.save_pretrained(tmp_path / "prior")
    meta = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert meta["model_type"] == "prior" and meta["config"]["schedule"]["prediction_type"] == "sample"
    assert meta["config"]["transformer"] == {**TINY_TRANSFORMER, "mlp_ratio": 4.0, "dropout": 0.0}
    stored = load_file(str(tmp_path / "prior" / "model.safetensors"))
    assert any(name.startswith("clip.vision.") for name in stored)  # the whole CLIP is kept
    loaded = mmgen.load(tmp_path / "prior")
    assert isinstance(loaded, DiffusionPrior) and not loaded.training
    for name, tensor in prior.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tokens = tokenize_prompts(PROMPTS, prior.context_length)
    x_t, t = torch.randn(2, 48), torch.tensor([5, 60])
    assert torch.equal(loaded(x_t, t, tokens), prior(x_t, t, tokens))
    assert torch.equal(PriorPipeline.from_pretrained(tmp_path / "prior")(PROMPTS, steps=3, progress=False),
                       PriorPipeline(prior)(PROMPTS, steps=3, progress=False))


def test_transformer_config_is_checked():
    with pytest.raises(ValueError, match="width 30 is not divisible by heads 4"):
        PriorTransformerConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="layers must be positive"):
        PriorTransformerConfig(layers=0)


def test_training_logs_the_similarity_and_writes_a_prior(unclip_runs):
    run = unclip_runs / "prior"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val/cosine" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    for record in evaluations:
        for key in ("val/cosine", "val/cosine_text", "val/cosine_unrelated", "val/cosine_text_baseline"):
            assert -1 <= record[key] <= 1, key
        assert record["val/loss"] > 0
    assert (run / "checkpoints" / "step-2" / "ema.safetensors").is_file()
    prior = mmgen.load(run)
    assert isinstance(prior, DiffusionPrior) and prior.config.transformer.width == 32
    assert torch.equal(prior.clip.logit_scale, make_clip(0).logit_scale)  # the CLIP was copied in


def test_resume_needs_no_clip_folder(unclip_runs, tmp_path):
    config = write_config(tmp_path, TINY_PRIOR_RECIPE, unclip_runs / "clip", "prior")
    run = tmp_path / "run"
    assert cli.main(["train", "prior", "--config", str(config), "--out", str(run), "samples.count=0"]) == 0
    shutil.rmtree(run / "final")
    saved = run / "config.yaml"
    saved.write_text(saved.read_text().replace(str(unclip_runs / "clip"), str(tmp_path / "nowhere")))
    assert cli.main(["train", "prior", "--resume", str(run)]) == 0  # the checkpoint carries the CLIP
    resumed = load_file(str(run / "final" / "model.safetensors"))
    whole = load_file(str(unclip_runs / "prior" / "final" / "model.safetensors"))
    assert resumed.keys() == whole.keys() and all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_train_bad_inputs_are_one_line(unclip_runs, tmp_path, capsys):
    GPT(GPTConfig(vocab_size=11, context_length=8, num_layers=1, num_heads=2, dim=16)).save_pretrained(tmp_path / "lm")
    config = write_config(tmp_path, TINY_PRIOR_RECIPE, tmp_path / "lm", "prior")
    cases = [
        ([], "holds a 'gpt' model, not a 'clip' one"),
        ([f"model.clip={tmp_path / 'nowhere'}"], "checkpoint not found"),
        ([f"model.clip={unclip_runs / 'clip'}", "samples.steps=80"], "samples.steps (80) exceeds the 50"),
        ([f"model.clip={unclip_runs / 'clip'}", "model.transformer.heads=3"], "not divisible by heads 3"),
        ([f"model.clip={unclip_runs / 'clip'}", "model.schedule.prediction_type=x0"], "prediction_type"),
    ]
    for overrides, fragment in cases:
        code, _, err = run_cli(["train", "prior", "--config", config, "--out", tmp_path / "run", *overrides], capsys)
        one_line_error(code, err, 2, fragment)
        assert not (tmp_path / "run").exists()
