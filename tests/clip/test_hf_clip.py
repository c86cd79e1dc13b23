"""transformers CLIP interop: random-init CLIPModel / CLIPTextModel folders converted both ways give the same outputs."""

import pytest
import torch
import transformers

import mmgen
from mmgen import cli
from mmgen.clip.hf_clip_interop import from_hf_clip, to_hf_clip
from mmgen.errors import UserError

from ..test_cli import one_line_error
from .helpers import perturb

VOCAB, CONTEXT = 99, 16


def text_config(**changes) -> transformers.CLIPTextConfig:
    options = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=CONTEXT, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2)
    return transformers.CLIPTextConfig(**{**options, **changes})


def clip_model(hidden_act: str = "quick_gelu", seed: int = 0) -> transformers.CLIPModel:
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, hidden_act=hidden_act)
    config = transformers.CLIPConfig(text_config=text_config(hidden_act=hidden_act).to_dict(),
                                     vision_config=vision.to_dict(), projection_dim=24)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config)
    perturb(model)  # biases and norms start at 0 / 1
    return model.eval()


def random_tokens(batch: int) -> torch.Tensor:
    """Start, random ids, end-of-text (the largest id) at a random place, then padding with a random id."""
    tokens = torch.randint(1, VOCAB - 2, (batch, CONTEXT))
    for row in range(batch):
        end = int(torch.randint(2, CONTEXT, (1,)))
        tokens[row, 0], tokens[row, end] = VOCAB - 2, VOCAB - 1
    return tokens


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_clip_model_round_trip(tmp_path, hidden_act):
    reference = clip_model(hidden_act)
    reference.save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", "hf-clip", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "mm")]) == 0
    clip = mmgen.load(tmp_path / "mm")
    images, tokens = torch.randn(3, 3, 32, 32), random_tokens(3)
    with torch.no_grad():
        expected_images = reference.get_image_features(pixel_values=images)
        expected_texts = reference.get_text_features(input_ids=tokens)
        expected_images, expected_texts = (getattr(e, "pooler_output", e) for e in (expected_images, expected_texts))
        torch.testing.assert_close(clip.encode_image(images, normalize=False), expected_images, atol=1e-4, rtol=0)
        torch.testing.assert_close(clip.encode_text(tokens, normalize=False), expected_texts, atol=1e-4, rtol=0)
        torch.testing.assert_close(clip.logit_scale, reference.logit_scale)
        back = to_hf_clip(clip).eval()
        again = back.get_text_features(input_ids=tokens)
        torch.testing.assert_close(getattr(again, "pooler_output", again), expected_texts, atol=1e-4, rtol=0)
        again = back.get_image_features(pixel_values=images)
        torch.testing.assert_close(getattr(again, "pooler_output", again), expected_images, atol=1e-4, rtol=0)


@pytest.mark.parametrize("with_projection", [False, True])
def test_text_model_alone(tmp_path, with_projection):
    torch.manual_seed(1)
    model_class = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    reference = model_class(text_config(projection_dim=20))
    perturb(reference)
    reference.eval().save_pretrained(tmp_path / "hf")
    clip = from_hf_clip(mmgen.clip.hf_clip_interop.load_hf_clip(tmp_path / "hf"))
    assert clip.config.vision is None
    tokens = random_tokens(4)
    with torch.no_grad():
        output = reference(input_ids=tokens, output_hidden_states=True)
        ours = clip.encode_text_tokens(tokens, normalize=False)
        pooled = output.text_embeds if with_projection else output.pooler_output
        torch.testing.assert_close(ours.embedding, pooled, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.token_states, output.last_hidden_state, atol=1e-4, rtol=0)
        # Stable Diffusion's "clip skip": the penultimate layer, through the final norm
        penultimate = getattr(reference, "text_model", reference).final_layer_norm(output.hidden_states[-2])
        torch.testing.assert_close(clip.encode_text_tokens(tokens, skip_last_layers=1).token_states, penultimate,
                                   atol=1e-4, rtol=0)
        back = to_hf_clip(clip).eval()
        assert type(back) is model_class
        torch.testing.assert_close(back(input_ids=tokens).last_hidden_state, output.last_hidden_state,
                                   atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="no image tower"):
        clip.encode_image(torch.randn(1, 3, 32, 32))


def test_pad_token_id_repads_after_end_of_text():
    torch.manual_seed(2)
    reference = transformers.CLIPTextModel(text_config()).eval()
    clip = from_hf_clip(reference)
    clip.config.text.pad_token_id = 7
    tokens = random_tokens(2)
    padded = tokens.clone()
    end = tokens.argmax(dim=-1)
    for row in range(2):
        padded[row, end[row] + 1:] = 7
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text_tokens(tokens).token_states,
                                   reference(input_ids=padded).last_hidden_state, atol=1e-4, rtol=0)


def test_unsupported_and_missing(tmp_path, capsys):
    with pytest.raises(UserError, match="layer_norm_eps"):
        from_hf_clip(transformers.CLIPTextModel(text_config(layer_norm_eps=1e-6)))
    with pytest.raises(UserError, match="eos_token_id"):
        from_hf_clip(transformers.CLIPTextModel(text_config(eos_token_id=5)))
    (tmp_path / "bert").mkdir()
    transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(tmp_path / "bert")
    code = cli.main(["convert", "hf-clip", "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "a")])
    one_line_error(code, capsys.readouterr().err, 1, "not one of CLIPModel")
    code = cli.main(["convert", "hf-clip", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "b")])
    assert code != 0 and "not found" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_help():
    assert cli.main(["convert", "hf-clip", "--help"]) == 0
