"""The unCLIP decoder's sampling defaults: its training run stores its grid's sampler, steps and guidance (or the
guidance its evaluation chose from samples.guidance_choices by the CLIP cosine of the decodings to the embeddings
they came from), and DecoderPipeline / UnCLIPPipeline use them when not told otherwise."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mmgen
from mmgen import cli
from mmgen.pipelines import unclip as unclip_pipeline
from mmgen.pipelines.unclip import DecoderPipeline
from tests.diffusion.helpers import older_folder
from tests.diffusion.unclip_helpers import TINY_DECODER_RECIPE, train_decoder_run, write_config


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    return train_decoder_run(tmp_path_factory.mktemp("decoder"), "samples.count=3", "samples.sampler=ddpm",
                             "samples.steps=3", "samples.guidance_choices=[4.0, 0.0, 2.0]", "train.max_steps=4",
                             "train.eval_every=2", "train.checkpoint_every=2")


def test_a_checkpoint_records_the_guidance_its_evaluation_chose(decoder_run):
    """The evaluation chooses on the EMA model, which shares the trained model's config: the checkpoint written
    after it (and a run resumed from it) has the chosen scale."""
    records = [json.loads(line) for line in (decoder_run / "run" / "metrics.jsonl").read_text().splitlines()]
    chosen = [record["samples/guidance_scale"] for record in records if record.get("step") == 2
              and "samples/guidance_scale" in record]
    stored = json.loads((decoder_run / "run" / "checkpoints" / "step-2" / "config.json").read_text())["config"]
    assert chosen and stored["guidance_scale"] == chosen[0]


def test_the_run_stores_the_sampler_steps_and_the_guidance_its_evaluation_chose(decoder_run):
    records = [json.loads(line) for line in (decoder_run / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [record for record in records if "samples/guidance_scale" in record][-1]
    cosines = {scale: last[f"samples/clip_cosine@{scale:g}"] for scale in (0.0, 2.0, 4.0)}
    assert len(set(cosines.values())) > 1  # the scales decode differently, so the choice means something
    assert all(-1.0 <= value <= 1.0 for value in cosines.values())
    best = max(cosines.values())
    assert last["samples/guidance_scale"] == min(scale for scale, value in cosines.items() if value == best)
    stored = json.loads((decoder_run / "run" / "final" / "config.json").read_text())["config"]
    assert (stored["sampler"], stored["sampling_steps"], stored["guidance_scale"]) == (
        "ddpm", 3, last["samples/guidance_scale"])


def test_the_pipeline_samples_with_the_stored_defaults(decoder_run, monkeypatch):
    decoder = mmgen.load(decoder_run / "run")
    pipeline = DecoderPipeline(decoder)
    assert (pipeline.sampler.kind, pipeline.sampler.steps) == ("ddpm", 3)
    used = []

    def recording(model, inputs, guidance_scale, **options):
        used.append(guidance_scale)
        return recording.__wrapped__(model, inputs, guidance_scale, **options)

    recording.__wrapped__ = unclip_pipeline.guided_model_fn
    monkeypatch.setattr(unclip_pipeline, "guided_model_fn", recording)
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(2, decoder.embed_dim), dim=1)
    decode = lambda **options: torch.stack([torch.from_numpy(np.asarray(image)) for image in pipeline(
        embeddings, ["a red circle", "a blue square"], seed=3, progress=False, **options)])
    stored = decoder.config.guidance_scale
    default = decode()
    assert torch.equal(default, decode(sampler="ddpm", steps=3, guidance_scale=stored))
    assert not torch.equal(default, decode(sampler="ddim", steps=3, guidance_scale=stored))
    assert used == [stored, stored, stored]


def test_a_folder_written_before_the_keys_decodes_with_ddim_50_at_guidance_3(decoder_run, tmp_path, monkeypatch):
    write = older_folder(decoder_run / "run" / "final", tmp_path / "old",
                         ("sampler", "sampling_steps", "guidance_scale"))
    write()
    pipeline = DecoderPipeline.from_pretrained(tmp_path / "old")
    assert (pipeline.sampler.kind, pipeline.sampler.steps) == ("ddim", 50)
    assert pipeline.decoder.config.guidance_scale is None
    assert unclip_pipeline.default_decoder_guidance(pipeline.decoder) == 3.0


@pytest.mark.parametrize("override, message", [
    ("samples.sampler=euler", "sampler must be one of"),
    ("samples.guidance_choices=[1.0, 1.0]", "repeats a scale"),
    ("samples.guidance_choices=[]", "guidance_choices must be a non-empty list"),
])
def test_bad_sampling_keys_are_one_line(decoder_run, tmp_path, capsys, override, message):
    config = write_config(tmp_path, TINY_DECODER_RECIPE, decoder_run / "clip", "decoder")
    assert cli.main(["train", "decoder", "--config", str(config), "--out", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_stored_keys_are_refused_on_load(decoder_run, tmp_path):
    write = older_folder(decoder_run / "run" / "final", tmp_path / "bad", ())
    for changes in ({"sampler": "euler"}, {"sampling_steps": 0}, {"guidance_scale": -1.0}):
        write(**changes)
        with pytest.raises(Exception, match="sampler|sampling_steps|guidance_scale"):
            mmgen.load(tmp_path / "bad")


def test_the_cli_records_the_decoder_defaults_it_sampled_with(decoder_run, tmp_path):
    """`mmgen sample variations` without --sampler / --steps / --guidance samples with, and records, the stored ones;
    given flags win."""
    image = tmp_path / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    stored = mmgen.load(decoder_run / "run").config
    for name, flags, expected in (("default", [], ("ddpm", 3, stored.guidance_scale)),
                                  ("given", ["--sampler", "ddim", "--steps", "2", "--guidance", "1.5"],
                                   ("ddim", 2, 1.5))):
        out = tmp_path / name
        assert cli.main(["sample", "variations", "--checkpoint", str(decoder_run / "run"), str(image), "--n", "1",
                         "--out", str(out), *flags]) == 0
        record = json.loads((out / "samples.json").read_text())
        assert (record["sampler"], record["steps"], record["guidance_scale"]) == expected
