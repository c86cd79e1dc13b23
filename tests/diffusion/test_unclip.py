"""The unCLIP decoder, the prior + decoder pipeline, image variations, `mmgen train decoder` and the unCLIP sampling
commands, with one line per user error."""

import dataclasses
import json

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import mmgen
from mmgen.diffusion import DecoderConfig, UnCLIPDecoder, UNetConfig, tokenize_prompts
from mmgen.errors import CheckpointError, UserError
from mmgen.pipelines import DecoderPipeline, UnCLIPPipeline
from tests.clip.helpers import make_clip
from tests.diffusion.helpers import TINY_UNET
from tests.diffusion.unclip_helpers import TINY_DECODER_RECIPE, tiny_decoder, tiny_prior, write_config
from tests.test_cli import one_line_error, run_cli

PROMPTS = ["a red circle", "a small blue square at the top left"]


@pytest.fixture(scope="module")
def decoder():
    return tiny_decoder()


def test_the_image_embedding_enters_as_context_tokens_and_pooled_vector(decoder):
    assert decoder.config.unet.context_dim == 64 and decoder.config.unet.pooled_dim == 48
    assert not any(p.requires_grad for p in decoder.clip.parameters())
    decoder.train()
    assert decoder.unet.training and not decoder.clip.training
    decoder.eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 90])
    embedding = torch.nn.functional.normalize(torch.randn(2, 48), dim=-1)
    tokens = tokenize_prompts(PROMPTS, decoder.context_length)
    output = decoder(x, t, embedding, tokens)
    assert output.shape == x.shape
    condition = decoder.encode_condition(embedding, tokens)
    assert torch.equal(decoder.denoise(x, t, condition), output)
    # both paths carry the embedding: the context tokens and the pooled vector added to the timestep embedding
    captured = {}
    handle = decoder.unet.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
    decoder(x, t, embedding, tokens)
    handle.remove()
    context, mask = captured["context"], captured["context_padding_mask"]
    assert context.shape == (2, decoder.context_length + 4, 64) and torch.equal(captured["pooled"], embedding)
    assert torch.equal(context[:, :decoder.context_length], condition.text.token_states)
    assert not mask[:, decoder.context_length:].any() and torch.equal(mask[:, :decoder.context_length],
                                                                       condition.text.padding_mask)
    other_embedding = decoder(x, t, torch.roll(embedding, 1, dims=0), tokens)
    other_text = decoder(x, t, embedding, torch.roll(tokens, 1, dims=0))
    assert not torch.allclose(other_embedding, output) and not torch.allclose(other_text, output)
    # no tokens: the empty prompt; the null condition is a zero embedding with it
    empty = tokenize_prompts(["", ""], decoder.context_length)
    assert torch.equal(decoder(x, t, embedding), decoder(x, t, embedding, empty))
    null = decoder.null_condition(2)
    assert not null.image_embedding.any()
    assert torch.equal(null.text.token_states, decoder.encode_text(empty).token_states)


def test_a_decoder_without_text_reads_only_the_embedding():
    decoder = tiny_decoder(text_conditioning=False)
    x, t, embedding = torch.randn(2, 3, 8, 8), torch.tensor([3, 90]), torch.randn(2, 48)
    assert decoder.encode_condition(embedding).text is None
    assert decoder(x, t, embedding).shape == x.shape
    with pytest.raises(ValueError, match="no text conditioning"):
        decoder(x, t, embedding, tokenize_prompts(PROMPTS, decoder.context_length))
    with pytest.raises(ValueError, match=r"image embeddings of shape \(batch, 48\)"):
        decoder(x, t, torch.randn(2, 32))


def test_encode_image_reads_minus_one_to_one_pixels_of_any_size(decoder):
    from mmgen.clip.preprocess import CLIP_MEAN, CLIP_STD

    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    expected = decoder.clip.encode_image(((pixels + 1) / 2 - mean) / std)
    torch.testing.assert_close(decoder.encode_image(pixels), expected)
    assert decoder.encode_image(torch.rand(2, 3, 8, 8)).shape == (2, 48)  # resized to the CLIP's 32


def test_config_checks_the_unet_fits_the_clip():
    clip_config = make_clip(0).config
    good = UNetConfig(**TINY_UNET, context_dim=64, pooled_dim=48)
    DecoderConfig(image_size=8, unet=good, clip=clip_config)
    with pytest.raises(ValueError, match="unet.pooled_dim is 32, the CLIP needs 48"):
        DecoderConfig(image_size=8, unet=dataclasses.replace(good, pooled_dim=32), clip=clip_config)
    with pytest.raises(ValueError, match="embedding_tokens must be positive"):
        DecoderConfig(image_size=8, unet=good, clip=clip_config, embedding_tokens=0)


def test_save_load_round_trip_is_exact(decoder, tmp_path):
    decoder.save_pretrained(tmp_path / "decoder")
    meta = json.loads((tmp_path / "decoder" / "config.json").read_text())
    assert meta["model_type"] == "decoder" and meta["config"]["embedding_tokens"] == 4
    assert any(name.startswith("clip.vision.") for name in load_file(str(tmp_path / "decoder" / "model.safetensors")))
    loaded = mmgen.load(tmp_path / "decoder")
    assert isinstance(loaded, UnCLIPDecoder) and not loaded.training
    x, t, embedding = torch.randn(2, 3, 8, 8), torch.tensor([5, 60]), torch.randn(2, 48)
    assert torch.equal(loaded(x, t, embedding), decoder(x, t, embedding))


@pytest.fixture(scope="module")
def pipeline(decoder):
    return UnCLIPPipeline(tiny_prior(), decoder)


def test_unclip_pipeline_end_to_end(pipeline):
    options = dict(num_images_per_prompt=2, steps=3, prior_steps=3, progress=False)
    first = pipeline(PROMPTS, seed=3, **options)
    assert len(first) == 4 and all(image.size == (8, 8) and image.mode == "RGB" for image in first)
    assert [image.tobytes() for image in pipeline(PROMPTS, seed=3, **options)] == [image.tobytes() for image in first]
    assert [image.tobytes() for image in pipeline(PROMPTS, seed=4, **options)] != [image.tobytes() for image in first]
    changed = pipeline(PROMPTS, seed=3, **{**options, "prior_guidance_scale": 5.0})
    assert [image.tobytes() for image in changed] != [image.tobytes() for image in first]
    # composition only: the same as sampling the prior, then decoding its embeddings with the prompts
    batch = [prompt for prompt in PROMPTS for _ in range(2)]
    embeddings = pipeline.prior(batch, steps=3, seed=3, progress=False)
    decoded = pipeline.decoder(embeddings, batch, steps=3, seed=3, progress=False)
    assert [image.tobytes() for image in decoded] == [image.tobytes() for image in first]


def test_unclip_pipeline_bad_inputs(pipeline, decoder):
    with pytest.warns(UserWarning, match="prompt 1 is empty"):
        assert len(pipeline([""], steps=2, prior_steps=2, progress=False)) == 1
    bad = [(dict(steps=101), "steps must lie between 1 and the model's 100"),
           (dict(prior_steps=0), "prior steps must lie between 1"),
           (dict(guidance_scale=-1.0), "guidance scale must be >= 0"),
           (dict(prior_guidance_scale=-1.0), "prior guidance scale must be >= 0"),
           (dict(sampler="ddpm", eta=0.5), "DDIM option"),
           (dict(num_images_per_prompt=0), "images per prompt")]
    for options, message in bad:
        with pytest.raises(UserError, match=message):
            pipeline("a red circle", progress=False, **options)
    with pytest.raises(UserError, match="no prompt"):
        pipeline([], progress=False)
    with pytest.raises(UserError, match="the prior makes CLIP image embeddings of width 32, the decoder reads "
                                        "width 48"):
        UnCLIPPipeline(tiny_prior(embed_dim=32), decoder)
    with pytest.warns(UserWarning, match="trained on different CLIPs"):
        UnCLIPPipeline(tiny_prior(seed=1), decoder)


def test_variations_decode_each_image_embedding(decoder):
    images = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue")]
    pipeline = DecoderPipeline(decoder)
    embeddings = pipeline.image_embeddings(images)
    assert embeddings.shape == (2, 48) and not torch.allclose(embeddings[0], embeddings[1])
    variations = pipeline.variations(images, num_variations=3, steps=3, progress=False)
    assert len(variations) == 6 and all(image.size == (8, 8) for image in variations)
    assert len({image.tobytes() for image in variations}) == 6  # each its own noise
    same = pipeline(embeddings.repeat_interleave(3, dim=0), steps=3, progress=False)
    assert [image.tobytes() for image in same] == [image.tobytes() for image in variations]
    with pytest.raises(UserError, match="variations per image must be >= 1"):
        pipeline.variations(images, num_variations=0)
    with pytest.raises(UserError, match="reads CLIP image embeddings of width 48"):
        pipeline(torch.randn(2, 32), progress=False)


@pytest.fixture(scope="module")
def runs(unclip_runs):
    """The session's tiny CLIP, prior and decoder runs, with two input images for variations."""
    for colour in ("red", "blue"):
        Image.new("RGB", (20, 20), colour).save(unclip_runs / f"{colour}.png")
    return unclip_runs


def test_train_decoder_logs_reconstruction_grids(runs):
    run = runs / "decoder"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    grid = [r for r in records if "samples/grid" in r][-1]
    assert grid["step"] == 2 and "val/loss" in grid
    assert Image.open(run / grid["samples/grid"]).size == (2 * 18 + 2, 2 * 18 + 2)  # originals, then decodings
    assert all(r["train/loss"] > 0 for r in records if "train/loss" in r)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"]["image_embedding_dropout"] == 0.2 and saved["model"]["text_conditioning"] is True
    assert isinstance(mmgen.load(run), UnCLIPDecoder)


def test_sample_text2img_with_a_prior_and_its_decoder(runs, tmp_path, capsys):
    command = ["sample", "text2img", "--checkpoint", runs / "prior", "--decoder", runs / "decoder", "--prompt",
               "a red circle", "--prompt", "a blue square", "--n", 2, "--steps", 2, "--prior-steps", 2]
    code, out, err = run_cli(command + ["--out", tmp_path / "a"], capsys)
    assert code == 0 and "wrote 4 images" in out, err
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000.png", "001.png", "002.png", "003.png", "grid.png", "samples.json"]
    assert Image.open(tmp_path / "a" / "000.png").size == (16, 16)
    record = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert record["decoder"] == str(runs / "decoder") and record["prior_steps"] == 2
    assert record["images"][2] == {"file": "002.png", "prompt": "a blue square"}


def test_sample_variations(runs, tmp_path, capsys):
    command = ["sample", "variations", "--checkpoint", runs / "decoder", runs / "red.png", runs / "blue.png",
               "--n", 3, "--steps", 2, "--out", tmp_path / "v"]
    code, out, err = run_cli(command, capsys)
    assert code == 0 and "wrote 6 images" in out, err
    assert Image.open(tmp_path / "v" / "005.png").size == (16, 16)
    assert Image.open(tmp_path / "v" / "grid.png").size == (3 * 18 + 2, 2 * 18 + 2)  # a row per input image
    record = json.loads((tmp_path / "v" / "samples.json").read_text())
    assert record["images"][3] == {"file": "003.png", "image": str(runs / "blue.png")}


def test_unclip_sampling_bad_inputs_are_one_line(runs, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    tiny_decoder(embed_dim=32).save_pretrained(tmp_path / "narrow")  # on a CLIP of another width
    text2img = ["sample", "text2img", "--prompt", "a red circle", "--steps", 2, "--prior-steps", 2, "--n", 1]
    cases = [
        (text2img + ["--checkpoint", runs / "decoder", "--decoder", runs / "decoder"], 1,
         "holds a 'decoder' model, not a 'prior' one"),
        (text2img + ["--checkpoint", runs / "prior", "--decoder", runs / "prior"], 1,
         "holds a 'prior' model, not a 'decoder' one"),
        (text2img + ["--checkpoint", runs / "prior"], 1, "holds an unCLIP prior: name its decoder with --decoder"),
        (text2img + ["--checkpoint", runs / "decoder"], 1, "holds a 'decoder' model, not a 'text2img' one"),
        (text2img + ["--checkpoint", runs / "prior", "--decoder", tmp_path / "narrow"], 1,
         "the prior makes CLIP image embeddings of width 48, the decoder reads width 32"),
        (text2img + ["--checkpoint", runs / "prior", "--decoder", runs / "decoder", "--clip-guidance", 1], 1,
         "--clip-guidance is not supported with an unCLIP prior"),
        (text2img + ["--checkpoint", runs / "prior", "--decoder", runs / "decoder", "--prior-steps", 51], 1,
         "prior steps must lie between 1 and the model's 50"),
        (["sample", "variations", "--checkpoint", runs / "prior", runs / "red.png"], 1,
         "holds a 'prior' model, not a 'decoder' one"),
        (["sample", "variations", "--checkpoint", runs / "decoder", tmp_path / "missing.png"], 1, "image not found"),
        (["sample", "variations", "--checkpoint", runs / "decoder", tmp_path / "broken.png"], 1,
         "broken.png: not a readable image"),
        (["sample", "variations", "--checkpoint", runs / "decoder", runs / "red.png", "--n", 0], 2,
         "--n: must be a positive integer"),
    ]
    for arguments, exit_code, fragment in cases:
        code, _, err = run_cli(arguments + ["--out", tmp_path / "x"], capsys)
        one_line_error(code, err, exit_code, fragment)
    assert not (tmp_path / "x").exists()
    code, out, err = run_cli(text2img[:2] + ["--prompt", "", "--checkpoint", runs / "prior", "--decoder",
                                             runs / "decoder", "--steps", 2, "--prior-steps", 2, "--n", 1,
                                             "--out", tmp_path / "empty"], capsys)
    assert code == 0 and "wrote 1 images" in out
    messages = [line for line in err.splitlines() if line.startswith("mmgen:")]
    assert messages == ["mmgen: warning: prompt 1 is empty: its images are sampled unconditionally"]


def test_train_decoder_bad_inputs_are_one_line(runs, tmp_path, capsys):
    config = write_config(tmp_path, TINY_DECODER_RECIPE, runs / "decoder", "decoder")
    cases = [
        ([], "model.clip="),
        ([f"model.clip={runs / 'clip'}", "model.unet.context_dim=32"], "model.unet.context_dim is set by the CLIP"),
        ([f"model.clip={runs / 'clip'}", "model.image_size=9"], "image_size must be a positive multiple of 2"),
        ([f"model.clip={runs / 'clip'}", "loss.image_embedding_dropout=2"], "image_embedding_dropout must lie in"),
        ([f"model.clip={runs / 'clip'}", "samples.prompts=[a]"], "samples.prompts is not used by the decoder"),
        ([f"model.clip={runs / 'clip'}", "samples.clip_guidance_scale=2"], "is for text-to-image models"),
    ]
    for overrides, fragment in cases:
        code, _, err = run_cli(["train", "decoder", "--config", config, "--out", tmp_path / "run", *overrides], capsys)
        one_line_error(code, err, 2, fragment)
        assert not (tmp_path / "run").exists()
    with pytest.raises(CheckpointError, match="holds a 'decoder' model, not a 'prior' one"):
        UnCLIPPipeline.from_pretrained(runs / "decoder", runs / "decoder")
