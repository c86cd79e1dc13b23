"""The options that give mmgen's UNet, attention and text conditioning Stable Diffusion's layout, one by one, and an
mmgen-built model in that layout exported to a diffusers folder that StableDiffusionPipeline loads."""

import pytest
import torch
from diffusers.models.activations import GEGLU as DiffusersGEGLU

from mmgen.clip.model import CLIPConfig, CLIPTextConfig
from mmgen.diffusion.schedule import NoiseSchedule
from mmgen.diffusion.text2img import TextToImage, TextToImageConfig, tokenize_prompts
from mmgen.diffusion.unet import UNet, UNetConfig
from mmgen.diffusion.vae import VAEConfig
from mmgen.nn import MultiHeadAttention
from mmgen.nn.mlp import GEGLU

SD_LAYOUT = dict(in_channels=4, out_channels=4, base_channels=16, channel_multipliers=(1, 2), blocks_per_level=1,
                 attention_levels=(True, True), groups=8, scale_shift_norm=False, mlp="geglu",
                 attention_qkv_bias=False, context_dim=32)


def test_geglu_matches_diffusers():
    torch.manual_seed(0)
    reference = DiffusersGEGLU(12, 20)
    ours = GEGLU(12, 20)
    with torch.no_grad():
        ours.fc_in.weight.copy_(reference.proj.weight)
        ours.fc_in.bias.copy_(reference.proj.bias)
        ours.fc_out.weight.copy_(torch.eye(12, 20))  # diffusers' GEGLU stops before the output projection
        ours.fc_out.bias.zero_()
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(ours(x), reference(x)[..., :12], atol=1e-5, rtol=0)


def test_attention_without_qkv_bias_and_upcast():
    attention = MultiHeadAttention(16, 2, context_dim=8, qkv_bias=False, upcast=True)
    assert attention.q_proj.bias is None and attention.kv_proj.bias is None and attention.out_proj.bias is not None
    torch.manual_seed(0)
    x, context = torch.randn(2, 6, 16), torch.randn(2, 4, 8)
    expected = attention(x, context)
    half = attention.to(torch.bfloat16)
    out = half(x.bfloat16(), context.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)


def test_heads_and_depth_per_level():
    config = UNetConfig(**SD_LAYOUT, head_dim=8, transformer_depth=(1, 3))
    assert [config.heads_at(level) for level in (0, 1)] == [2, 4]
    unet = UNet(config)
    attention = unet.down_levels[1].stages[0].attention
    assert attention.block.attn.num_heads == 4 and len(attention.further_blocks) == 2
    assert len(unet.mid_stage.attention.further_blocks) == 2  # the middle block takes the last level's
    assert unet.down_levels[0].stages[0].attention.block.mlp.fc_in.out_features == 2 * 4 * 16  # GEGLU: value + gate
    assert len(UNet(UNetConfig(**SD_LAYOUT, heads_per_level=(1, 4))).up_levels[0].stages) == 2
    with pytest.raises(ValueError, match="not both"):
        UNetConfig(**SD_LAYOUT, head_dim=8, heads_per_level=(2, 4))
    with pytest.raises(ValueError, match=r"heads_per_level\[1\] = 3"):
        UNetConfig(**SD_LAYOUT, heads_per_level=(2, 3))
    with pytest.raises(ValueError, match="one positive integer per level"):
        UNetConfig(**SD_LAYOUT, transformer_depth=(1,))


def sd_layout_model(seed: int = 0, **options) -> TextToImage:
    """A tiny mmgen latent text2img in SD 2's layout (text encoder alone, no pooled vector, v-prediction)."""
    text = CLIPConfig(embed_dim=32, vision=None, text=CLIPTextConfig(context_length=77, width=32, layers=3, heads=4))
    config = TextToImageConfig(
        image_size=16, unet=UNetConfig(**SD_LAYOUT, heads_per_level=(2, 4)), text_encoder=text,
        schedule=NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                               prediction_type="v_prediction"),
        vae=VAEConfig(base_channels=8, channel_multipliers=(1, 2), groups=4), mask_text_padding=False, **options)
    torch.manual_seed(seed)
    model = TextToImage(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def test_text_skip_layers_takes_an_earlier_layer():
    model = sd_layout_model(text_skip_layers=1)
    tokens = tokenize_prompts(["a red circle", ""], 77)
    expected = model.text_encoder.encode_text_tokens(tokens, skip_last_layers=1).token_states
    states = model.encode_condition(tokens).token_states
    torch.testing.assert_close(states, expected, atol=0, rtol=0)
    assert not torch.allclose(states, model.text_encoder.encode_text_tokens(tokens).token_states)


def test_mmgen_built_model_exports_to_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    from mmgen.diffusion.stable_diffusion import to_stable_diffusion

    model = sd_layout_model(text_skip_layers=1)  # the export drops the skipped layer from the text encoder
    to_stable_diffusion(model, tmp_path / "sd")
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True, safety_checker=None)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert pipeline.text_encoder.config.num_hidden_layers == 2 and pipeline.tokenizer.pad_token == "!"
    tokens = tokenize_prompts(["a red circle", "a blue square"], 77)
    ids = pipeline.tokenizer(["a red circle", "a blue square"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(1)
    latents, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([3, 980])
    with torch.no_grad():
        states = pipeline.text_encoder(ids).last_hidden_state
        torch.testing.assert_close(states, model.encode_condition(tokens).token_states, atol=1e-4, rtol=0)
        expected = pipeline.unet(latents, t, encoder_hidden_states=states).sample
        torch.testing.assert_close(model(latents, t, tokens), expected, atol=1e-4, rtol=0)
        image = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample
        torch.testing.assert_close(model.decode_samples(latents), image, atol=1e-4, rtol=0)


def test_lora_mlp_targets_cover_geglu():
    from mmgen.finetune.lora import target_layers

    layers = target_layers(sd_layout_model(), ["mlp"])
    assert "unet.down_levels.0.stages.0.attention.block.mlp.fc_in" in layers
    assert "unet.down_levels.0.stages.0.attention.block.mlp.fc_out" in layers
