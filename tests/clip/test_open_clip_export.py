"""`mmgen export open-clip`: an mmgen CLIP written as open_clip's local-dir folder, read back by open_clip itself."""

import json

import open_clip
import pytest
import torch

from mmgen.clip import CLIPTokenizer
from mmgen.clip.open_clip_interop import export_open_clip
from mmgen.errors import UserError
from tests.clip.helpers import make_clip, random_tokens
from tests.test_cli import one_line_error, run_cli


@pytest.mark.parametrize("mlp", ["gelu", "quick_gelu", "gelu_tanh"])
def test_open_clip_loads_the_folder_with_equal_embeddings(tmp_path, mlp):
    clip = make_clip(1, mlp=mlp, init_logit_bias=-2.0)
    export_open_clip(clip, tmp_path / "oc")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    model.eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = random_tokens(3, 16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, normalize=True), clip.encode_image(images),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.encode_text(tokens, normalize=True), clip.encode_text(tokens),
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.logit_scale.detach().reshape(()), clip.logit_scale.detach())
    torch.testing.assert_close(model.logit_bias.detach().reshape(()), clip.logit_bias.detach())
    # open_clip's tokenizer for the folder is CLIP's BPE at the model's context length, as mmgen's
    texts = ["a red circle", "two blue squares"]
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(texts), CLIPTokenizer(16)(texts))
    assert preprocess.transforms[-1].mean == [0.48145466, 0.4578275, 0.40821073]


def test_export_cli_writes_the_folder_and_refuses_what_open_clip_cannot_express(tmp_path, capsys):
    assert run_cli(["export", "open-clip", "--help"], capsys)[0] == 0
    make_clip(0).save_pretrained(tmp_path / "clip")
    code, out, err = run_cli(["export", "open-clip", "--checkpoint", tmp_path / "clip", "--out", tmp_path / "oc"],
                             capsys)
    assert code == 0, err
    assert "local-dir:" in out
    assert sorted(path.name for path in (tmp_path / "oc").iterdir()) == ["open_clip_config.json",
                                                                         "open_clip_model.safetensors"]
    assert json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 48
    code, _, err = run_cli(["export", "open-clip", "--checkpoint", tmp_path / "clip", "--out", tmp_path / "oc"], capsys)
    one_line_error(code, err, 1, "already exists and is not empty")
    make_clip(0, vision=None).save_pretrained(tmp_path / "text-only")
    code, _, err = run_cli(["export", "open-clip", "--checkpoint", tmp_path / "text-only", "--out", tmp_path / "x"],
                           capsys)
    one_line_error(code, err, 1, "a CLIP without an image tower (a text encoder alone) cannot be expressed")
    assert not (tmp_path / "x").exists()
    code, _, err = run_cli(["export", "open-clip", "--checkpoint", tmp_path / "none", "--out", tmp_path / "x"], capsys)
    one_line_error(code, err, 1, "checkpoint not found")


def test_a_swiglu_clip_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="^a CLIP with a swiglu MLP cannot be expressed as open_clip's CLIP"):
        export_open_clip(make_clip(0, mlp="swiglu"), tmp_path / "oc")
    assert not (tmp_path / "oc").exists()
