"""CLIP model: shapes, normalisation, logit scale, EOT pooling, presets, checkpointing and save/load."""

import math

import pytest
import torch

import mmgen
from mmgen.clip import CLIP, CLIPConfig, ClipLoss, CLIPTextConfig, CLIPVisionConfig, clip_config
from mmgen.config import from_dict, to_dict
from mmgen.errors import ConfigError

from .helpers import EOT, make_clip, random_tokens, tiny_config


def test_forward_shapes_and_unit_length_features():
    model = make_clip()
    images, tokens = torch.randn(3, 3, 32, 32), random_tokens(3, 16)
    output = model(images, tokens)
    assert output.image_features.shape == (3, 48) and output.text_features.shape == (3, 48)
    torch.testing.assert_close(output.image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(output.text_features.norm(dim=-1), torch.ones(3))
    raw = model.encode_image(images, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)
    torch.testing.assert_close(output.image_features, raw / raw.norm(dim=-1, keepdim=True))
    assert output.logit_bias is None
    encoding = model.encode_text_tokens(tokens)
    assert encoding.token_states.shape == (3, 16, 64)
    torch.testing.assert_close(encoding.embedding, output.text_features)


def test_logit_scale_starts_at_one_over_0_07_and_is_clamped_at_100():
    model = CLIP(tiny_config()).eval()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.logit_scale_exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    output = model(torch.randn(2, 3, 32, 32), random_tokens(2, 16))
    assert output.logit_scale.item() == pytest.approx(100.0)


def test_logit_bias_is_a_parameter_when_configured():
    model = CLIP(tiny_config(init_logit_bias=-10.0))
    output = model(torch.randn(2, 3, 32, 32), random_tokens(2, 16))
    assert output.logit_bias.item() == -10.0 and output.logit_bias.requires_grad
    assert "logit_bias" in model.state_dict() and "logit_bias" not in CLIP(tiny_config()).state_dict()


def test_text_is_pooled_at_the_end_of_text_token():
    model = make_clip()
    tokens = random_tokens(4, 16, torch.Generator().manual_seed(3))
    end = (tokens == EOT).int().argmax(dim=-1)
    encoding = model.encode_text_tokens(tokens, normalize=False)
    expected = model.text.projection(encoding.token_states[torch.arange(4), end])
    torch.testing.assert_close(encoding.embedding, expected)
    assert torch.equal(encoding.padding_mask, torch.arange(16)[None, :] > end[:, None])
    # causal: what follows the end of text does not matter, what precedes it does
    after, before = tokens.clone(), tokens.clone()
    after[0, end[0] + 1 :] = 7
    before[0, 1] = (before[0, 1] + 1) % (EOT - 1)
    torch.testing.assert_close(model.encode_text(after), model.encode_text(tokens))
    assert not torch.allclose(model.encode_text(before)[0], model.encode_text(tokens)[0], atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    reference = make_clip().train()
    checkpointed = CLIP(tiny_config(gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(reference.state_dict())
    assert checkpointed.vision.transformer.gradient_checkpointing
    assert checkpointed.text.transformer.gradient_checkpointing
    images, tokens = torch.randn(4, 3, 32, 32), random_tokens(4, 16)
    for model in (reference, checkpointed):
        ClipLoss()(*model(images, tokens)).backward()
    for (name, expected), actual in zip(reference.named_parameters(), checkpointed.parameters()):
        assert expected.grad.abs().sum() > 0, name
        torch.testing.assert_close(actual.grad, expected.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_save_pretrained_and_mmgen_load_round_trip_exactly(tmp_path):
    model = make_clip(init_logit_bias=-5.0, mlp="quick_gelu")
    model.save_pretrained(tmp_path / "clip")
    loaded = mmgen.load(tmp_path / "clip")
    assert isinstance(loaded, CLIP) and loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    images, tokens = torch.randn(2, 3, 32, 32), random_tokens(2, 16)
    for expected, actual in zip(model(images, tokens), loaded(images, tokens)):
        assert torch.equal(actual, expected)


def test_initialisation_follows_open_clip():
    torch.manual_seed(0)
    model = CLIP(tiny_config(text=CLIPTextConfig(context_length=77, width=128, layers=2, heads=4)))
    assert model.text.position_embedding.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert model.text.projection.weight.std().item() == pytest.approx(128**-0.5, rel=0.1)
    assert model.vision.projection.weight.std().item() == pytest.approx(64**-0.5, rel=0.1)
    block = model.text.transformer.blocks[0]
    assert block.attn.qkv_proj.weight.std().item() == pytest.approx(128**-0.5, rel=0.1)
    assert block.mlp.fc_out.weight.std().item() == pytest.approx(128**-0.5 * 4**-0.5, rel=0.1)
    assert torch.count_nonzero(block.attn.qkv_proj.bias) == 0


def test_config_validation_and_nested_dict_round_trip():
    with pytest.raises(ValueError, match="not divisible by heads"):
        CLIPVisionConfig(width=60, heads=8)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        CLIPVisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="mlp must be one of"):
        CLIPConfig(mlp="relu")
    with pytest.raises(ValueError, match="context_length"):
        CLIPTextConfig(context_length=1)
    config = tiny_config(init_logit_bias=-10.0)
    assert from_dict(CLIPConfig, to_dict(config)) == config
    with pytest.raises(ConfigError, match="vision.heads"):
        from_dict(CLIPConfig, {"vision": {"heads": "many"}})


def test_presets_match_open_clip_shapes():
    import open_clip

    for name in ("ViT-B-32", "ViT-B-16", "ViT-L-14"):
        reference = open_clip.get_model_config(name)
        config = clip_config(name)
        vision, text = reference["vision_cfg"], reference["text_cfg"]
        assert config.embed_dim == reference["embed_dim"]
        assert (config.vision.image_size, config.vision.patch_size, config.vision.width, config.vision.layers) == (
            vision["image_size"], vision["patch_size"], vision["width"], vision["layers"]
        )
        assert config.vision.heads == vision["width"] // 64  # open_clip's default head width
        assert (config.text.context_length, config.text.vocab_size, config.text.width) == (
            text["context_length"], text["vocab_size"], text["width"]
        )
        assert (config.text.heads, config.text.layers) == (text["heads"], text["layers"])
    assert clip_config("ViT-B-32-quickgelu").mlp == "quick_gelu" and clip_config("ViT-B-32").mlp == "gelu"
    tiny = CLIP(clip_config("tiny")).eval()
    assert tiny.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    with pytest.raises(ValueError, match="unknown CLIP size"):  # model code: ValueError, not the CLI's UserError
        clip_config("ViT-Z-99")


def test_wrong_image_size_or_too_long_text_is_refused():
    model = make_clip()
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        model.encode_image(torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match="exceeds"):
        model.encode_text(random_tokens(1, 17))
