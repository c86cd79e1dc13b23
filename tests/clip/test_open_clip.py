"""open_clip interop: random-init open_clip models converted both ways give the same embeddings."""

import json
from dataclasses import replace

import open_clip
import pytest
import torch

import mmgen
from mmgen.clip import CLIP, clip_config, convert_open_clip, from_open_clip, to_open_clip
from mmgen.clip.open_clip_interop import _parameter_pairs
from mmgen.errors import UserError

from .helpers import make_clip, perturb, random_tokens

TINY_VIT = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
VARIANTS = {
    "mmgen-test-tiny-vit": TINY_VIT,
    "mmgen-test-tiny-vit-quickgelu": {**TINY_VIT, "quick_gelu": True},
    "mmgen-test-tiny-layer-scale": {**TINY_VIT, "vision_cfg": {**TINY_VIT["vision_cfg"], "ls_init_value": 0.1}},
    "mmgen-test-tiny-resnet": {
        **TINY_VIT,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
    },
    "mmgen-test-tiny-text-last": {**TINY_VIT, "text_cfg": {**TINY_VIT["text_cfg"], "pool_type": "last"}},
}


@pytest.fixture(scope="module", autouse=True)
def tiny_open_clip_configs(tmp_path_factory):
    """Register small open_clip model configs (open_clip reads them by file name)."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, config in VARIANTS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def random_open_clip(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    perturb(model)  # in_proj biases and norms start at 0 / 1 in open_clip
    return model.eval()


def assert_same_embeddings(clip: CLIP, reference, batch: int = 3):
    images = torch.randn(batch, 3, 32, 32)
    tokens = random_tokens(batch, 16)
    with torch.no_grad():
        expected_images = reference.encode_image(images, normalize=True)
        expected_texts = reference.encode_text(tokens, normalize=True)
        torch.testing.assert_close(clip.encode_image(images), expected_images, atol=1e-4, rtol=0)
        torch.testing.assert_close(clip.encode_text(tokens), expected_texts, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "name, mlp", [("mmgen-test-tiny-vit", "gelu"), ("mmgen-test-tiny-vit-quickgelu", "quick_gelu")]
)
def test_from_open_clip_gives_the_same_embeddings(name, mlp):
    reference = random_open_clip(name)
    clip = from_open_clip(reference).eval()
    assert clip.config.mlp == mlp
    assert (clip.config.embed_dim, clip.config.vision.heads, clip.config.text.context_length) == (48, 4, 16)
    assert clip.logit_scale.item() == reference.logit_scale.item()
    assert_same_embeddings(clip, reference)


@pytest.mark.parametrize("changes", [{}, {"mlp": "quick_gelu"}, {"mlp": "gelu_tanh", "init_logit_bias": -10.0}])
def test_to_open_clip_gives_the_same_embeddings_and_converts_back_exactly(changes):
    clip = make_clip(**changes)
    reference = to_open_clip(clip).eval()
    assert_same_embeddings(clip, reference)
    if "init_logit_bias" in changes:
        assert reference.logit_bias.item() == clip.logit_bias.item()
    back = from_open_clip(reference)
    # the converted config's init_logit_scale / init_logit_bias are the converted values, the rest is identical
    assert replace(back.config, init_logit_scale=0.0, init_logit_bias=None) == replace(
        clip.config, init_logit_scale=0.0, init_logit_bias=None
    )
    assert back.config.init_logit_scale == clip.logit_scale.item()
    for name, tensor in clip.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_parameter_layout_of_full_size_models_matches_open_clip():
    # ViT-B-32 etc. on the meta device: names and shapes of every mapped parameter, without allocating weights
    for name in ("ViT-B-32", "ViT-L-14"):
        config = clip_config(name)
        with torch.device("meta"):
            ours = CLIP(config).state_dict()
            theirs = open_clip.CLIP(**open_clip.get_model_config(name)).state_dict()
        pairs = _parameter_pairs(config)
        assert {p[0] for p in pairs} == set(ours) and {p[1] for p in pairs} == set(theirs)
        for our_name, their_name, transposed in pairs:
            their_shape = theirs[their_name].shape
            assert ours[our_name].shape == (their_shape[::-1] if transposed else their_shape), our_name


@pytest.mark.parametrize(
    "name, problem",
    [
        ("mmgen-test-tiny-layer-scale", "layer scale"),
        ("mmgen-test-tiny-resnet", "ModifiedResNet"),
        ("mmgen-test-tiny-text-last", "text pooling 'last'"),
    ],
)
def test_unsupported_open_clip_models_are_refused(name, problem):
    with pytest.raises(UserError, match=problem):
        from_open_clip(random_open_clip(name))


def test_swiglu_cannot_be_exported():
    with pytest.raises(UserError, match="a CLIP with a swiglu MLP cannot be expressed"):
        to_open_clip(make_clip(mlp="swiglu"))


def test_convert_open_clip_from_a_local_file_then_mmgen_load(tmp_path):
    reference = random_open_clip("mmgen-test-tiny-vit-quickgelu", seed=5)
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    convert_open_clip("mmgen-test-tiny-vit-quickgelu", str(tmp_path / "weights.pt"), tmp_path / "converted")
    clip = mmgen.load(tmp_path / "converted")
    assert isinstance(clip, CLIP) and clip.config.text.context_length == 16 and clip.config.mlp == "quick_gelu"
    assert_same_embeddings(clip, reference)


def test_convert_open_clip_reports_unreachable_tags_and_bad_names(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    unreachable = "'openai' for open_clip ViT-B-32 could not be downloaded.*local checkpoint FILE"
    with pytest.raises(UserError, match=unreachable):
        convert_open_clip("ViT-B-32", "openai", tmp_path / "out")
    with pytest.raises(UserError, match="file not found"):
        convert_open_clip("ViT-B-32", str(tmp_path / "missing.pt"), tmp_path / "out")
    with pytest.raises(UserError, match="unknown open_clip model"):
        convert_open_clip("ViT-Z-99", None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
