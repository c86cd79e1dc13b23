"""A stored guidance interval (config.json's guidance_interval): a decoder or text-to-image run stores its grid's
samples.guidance_interval, and the pipelines and `mmgen sample` guide only at those timesteps unless told otherwise;
malformed intervals are refused in one line (config) or on load (folder)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mmgen
from mmgen import cli
from mmgen.errors import UserError
from mmgen.pipelines import TextToImagePipeline
from mmgen.pipelines import unclip as unclip_pipeline
from mmgen.pipelines.unclip import DecoderPipeline
from tests.diffusion.helpers import older_folder, tiny_text2img
from tests.diffusion.unclip_helpers import TINY_DECODER_RECIPE, train_decoder_run, write_config
from tests.finetune.helpers import FAST_TRAIN, write_yaml

INTERVAL = [0, 20]  # of the tiny decoder's 50 training timesteps


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    return train_decoder_run(tmp_path_factory.mktemp("decoder-interval"), "samples.count=2", "samples.sampler=ddpm",
                             "samples.steps=4", "samples.guidance_scale=4.0", f"samples.guidance_interval={INTERVAL}")


def embeddings_of(decoder, count: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(count, decoder.embed_dim), dim=1)


def test_the_decoder_run_stores_the_interval_and_the_pipeline_guides_only_there(decoder_run, monkeypatch):
    stored = json.loads((decoder_run / "run" / "final" / "config.json").read_text())["config"]
    assert stored["guidance_interval"] == INTERVAL
    decoder = mmgen.load(decoder_run / "run")
    pipeline, embeddings = DecoderPipeline(decoder), embeddings_of(decoder)
    used = []

    def recording(model, inputs, guidance_scale, **options):
        used.append(options.get("interval"))
        return recording.__wrapped__(model, inputs, guidance_scale, **options)

    recording.__wrapped__ = unclip_pipeline.guided_model_fn
    monkeypatch.setattr(unclip_pipeline, "guided_model_fn", recording)

    def decode(**options):
        images = pipeline(embeddings, ["a red circle", "a blue square"], seed=3, progress=False, **options)
        return torch.stack([torch.from_numpy(np.array(image)) for image in images])

    default = decode()
    assert torch.equal(default, decode(guidance_interval=(0, 20)))
    assert not torch.equal(default, decode(guidance_interval=(0, 49)))  # guiding at every step differs
    assert used == [(0, 20), (0, 20), (0, 49)]
    with pytest.raises(UserError, match="t_low <= t_high"):
        decode(guidance_interval=(30, 10))


def test_text2img_models_use_their_stored_interval():
    model = tiny_text2img()
    pipeline = TextToImagePipeline(model)
    sample = lambda **options: pipeline(["a red circle"], steps=4, guidance_scale=5.0, seed=1, progress=False,
                                        output_type="pt", **options)
    every_step = sample()
    model.config.guidance_interval = [0, 30]
    stored = sample()
    assert torch.equal(stored, sample(guidance_interval=(0, 30)))
    assert not torch.equal(stored, every_step)
    assert torch.equal(every_step, sample(guidance_interval=(0, 99)))  # the whole range: guidance at every step


def test_bad_intervals_are_one_line_or_refused_on_load(decoder_run, tmp_path, capsys):
    config = write_config(tmp_path, TINY_DECODER_RECIPE, decoder_run / "clip", "decoder")
    for interval in ("[5, 2]", "[-1, 3]", "[1, 2, 3]"):
        assert cli.main(["train", "decoder", "--config", str(config), "--out", str(tmp_path / "run"),
                         f"samples.guidance_interval={interval}"]) == 2
        err = capsys.readouterr().err
        assert "guidance_interval must be [t_low, t_high]" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "run").exists()
    write = older_folder(decoder_run / "run" / "final", tmp_path / "bad", ())
    write(guidance_interval=[9, 1])
    with pytest.raises(Exception, match="guidance_interval"):
        mmgen.load(tmp_path / "bad")


def test_the_cli_records_the_interval_it_sampled_with(decoder_run, tmp_path):
    image = tmp_path / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "variations"
    assert cli.main(["sample", "variations", "--checkpoint", str(decoder_run / "run"), str(image), "--n", "1",
                     "--out", str(out)]) == 0
    assert json.loads((out / "samples.json").read_text())["guidance_interval"] == INTERVAL


def test_full_finetuning_keeps_the_bases_interval_unless_its_grid_sets_one(tmp_path):
    base = tiny_text2img()
    base.config.guidance_interval = [0, 30]
    base.save_pretrained(tmp_path / "base")
    config = {"method": "full", "data": {"train": "shapes:train:16", "val": None},
              "samples": {"prompts": ["a red circle"], "count": 1, "steps": 2}, "train": dict(FAST_TRAIN, max_steps=2)}
    for name, extra, expected in (("kept", [], [0, 30]), ("set", ["samples.guidance_interval=[0, 10]"], [0, 10])):
        assert cli.main(["finetune", "diffusion", "--base", str(tmp_path / "base"), "--config",
                         str(write_yaml(tmp_path / f"{name}.yaml", config)), "--out", str(tmp_path / name),
                         *extra]) == 0
        assert json.loads((tmp_path / name / "final" / "config.json").read_text())["config"][
            "guidance_interval"] == expected
