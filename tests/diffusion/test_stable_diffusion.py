"""Stable Diffusion interop: tiny random-init diffusers SD folders (SD-1-like and SD-2-like) converted to mmgen and
back give diffusers' UNet outputs, text states and images; what cannot convert is one clear line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

import mmgen
from mmgen import cli
from mmgen.diffusion.samplers import SamplerConfig
from mmgen.diffusion.stable_diffusion import to_stable_diffusion, write_clip_bpe_files
from mmgen.diffusion.text2img import TextToImage, tokenize_prompts
from mmgen.errors import UserError
from mmgen.pipelines.text2img import TextToImagePipeline

from ..test_cli import one_line_error

PROMPTS = ["a photo of a red cat", "two blue squares on grass"]
NEGATIVE = "blurry"

VARIANTS = {
    # SD 1: 8 heads everywhere (attention_head_dim counts heads), 1x1-conv proj_in/out, epsilon, pads with end-of-text
    "sd1": dict(
        unet=dict(attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        prediction_type="epsilon", pad_token="<|endoftext|>", hidden_act="quick_gelu",
    ),
    # SD 2: heads per level, linear proj_in/out, upcast attention, two blocks per transformer at level 1, v-prediction,
    # pads with "!"
    "sd2": dict(
        unet=dict(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                  transformer_layers_per_block=(1, 2), down_block_types=("CrossAttnDownBlock2D",) * 2,
                  up_block_types=("CrossAttnUpBlock2D",) * 2),
        prediction_type="v_prediction", pad_token="!", hidden_act="gelu",
    ),
}


def perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every weight off its initial value (zero-initialised outputs, unit norms) so comparisons cover it."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)


def write_sd_folder(folder: Path, variant: str, seed: int = 0) -> Path:
    """A tiny random-init StableDiffusionPipeline folder, its tokenizer built from CLIP's BPE files (no hub)."""
    spec = VARIANTS[variant]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, cross_attention_dim=32, norm_num_groups=8, **spec["unet"])
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=spec["hidden_act"], bos_token_id=49406, eos_token_id=49407))
    for module in (unet, vae, text_encoder):
        perturb(module)
    scratch = folder.parent / f"{folder.name}-bpe"
    scratch.mkdir()
    vocab_file, merges_file = write_clip_bpe_files(scratch)
    tokenizer = transformers.CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=spec["pad_token"],
                                           model_max_length=77)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=spec["prediction_type"])
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory) -> dict[str, Path]:
    """One tiny SD folder per variant."""
    return {variant: write_sd_folder(tmp_path_factory.mktemp(variant) / "sd", variant) for variant in VARIANTS}


@pytest.fixture(scope="module", params=list(VARIANTS))
def converted(request, sd_folders):
    """(variant, SD folder, the diffusers pipeline, the mmgen model converted through the CLI, its folder)."""
    folder = sd_folders[request.param]
    root = folder.parent
    assert cli.main(["convert", "stable-diffusion", "--model", str(folder), "--out", str(root / "mm")]) == 0
    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    return request.param, folder, pipeline, mmgen.load(root / "mm"), root / "mm"


def test_unet_matches_diffusers(converted):
    variant, _, pipeline, model, _ = converted
    assert isinstance(model, TextToImage)
    assert model.config.schedule.prediction_type == VARIANTS[variant]["prediction_type"]
    assert model.config.image_size == 16 and model.config.unet.pooled_dim is None
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([1, 420, 999])
    states = torch.randn(3, 77, 32, generator=generator)
    with torch.no_grad():
        expected = pipeline.unet(latents, t, encoder_hidden_states=states).sample
        ours = model.unet(latents, t, context=states)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_text_states_match_diffusers_tokenizer_and_encoder(converted):
    _, _, pipeline, model, _ = converted
    prompts = PROMPTS + [""]
    ids = pipeline.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    ours = tokenize_prompts(prompts, model.context_length)
    ends = ours.argmax(dim=-1)
    for row, end in enumerate(ends.tolist()):  # the same ids up to end-of-text; the padding is the model's business
        assert torch.equal(ours[row, : end + 1], ids[row, : end + 1])
    with torch.no_grad():
        expected = pipeline.text_encoder(ids).last_hidden_state
        torch.testing.assert_close(model.encode_condition(ours).token_states, expected, atol=1e-4, rtol=0)


def pipeline_images(pipeline, model, latents, steps=4, guidance=5.0):
    """diffusers' and mmgen's images (uint8 arrays) for PROMPTS from the same latents, DDIM, CFG, negative prompt."""
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing",
                                                   set_alpha_to_one=True)
    theirs = pipeline(PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=steps, guidance_scale=guidance,
                      latents=latents.clone(), output_type="np").images
    ours = TextToImagePipeline(model, sampler=SamplerConfig(kind="ddim", steps=steps, clip_sample=False))(
        PROMPTS, negative_prompt=NEGATIVE, guidance_scale=guidance, latents=latents.clone(), progress=False)
    return np.round(theirs * 255).astype(np.int16), np.stack([np.asarray(image, dtype=np.int16) for image in ours])


def test_images_match_stable_diffusion_pipeline(converted, tmp_path):
    _, _, pipeline, model, model_folder = converted
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    theirs, ours = pipeline_images(pipeline, model, latents)
    assert theirs.shape == ours.shape == (2, 16, 16, 3)
    assert np.abs(theirs - ours).max() <= 1  # one uint8 level: rounding of values within 1e-3 of each other
    assert theirs.std() > 5  # the images are not flat: the comparison means something
    # and `mmgen sample text2img` takes the converted folder as it is
    assert cli.main(["sample", "text2img", "--checkpoint", str(model_folder), "--prompt", PROMPTS[0], "--n", "1",
                     "--steps", "2", "--negative-prompt", NEGATIVE, "--out", str(tmp_path / "images")]) == 0
    assert len(list((tmp_path / "images").glob("*.png"))) >= 1


def test_export_loads_in_diffusers_with_the_same_images(converted, tmp_path):
    variant, _, pipeline, model, model_folder = converted
    if variant != "sd2":
        pytest.skip("one variant keeps the file fast: SD 2's has every option SD 1's has, and more")
    assert cli.main(["export", "stable-diffusion", "--checkpoint", str(model_folder), "--out",
                     str(tmp_path / "export")]) == 0
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "export", local_files_only=True,
                                                       safety_checker=None)
    assert exported.tokenizer.pad_token == VARIANTS[variant]["pad_token"]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    theirs, ours = pipeline_images(exported, model, latents)
    assert np.abs(theirs - ours).max() <= 1


def test_export_refuses_what_sd_cannot_express(tmp_path, capsys):
    from mmgen.clip.model import clip_config
    from mmgen.diffusion.text2img import TextToImageConfig
    from mmgen.diffusion.unet import UNetConfig
    from mmgen.diffusion.vae import VAEConfig

    clip = clip_config("tiny")
    unet = UNetConfig(in_channels=4, out_channels=4, base_channels=16, groups=8, channel_multipliers=(1, 2),
                      attention_levels=(False, True), context_dim=64, pooled_dim=64)
    model = TextToImage(TextToImageConfig(16, unet, text_encoder=clip,
                                          vae=VAEConfig(base_channels=8, channel_multipliers=(1, 2), groups=4)))
    with pytest.raises(UserError, match="masked text padding.*pooled text embedding") as error:
        to_stable_diffusion(model, tmp_path / "out")
    assert "\n" not in str(error.value)
    model.save_pretrained(tmp_path / "glide")
    code = cli.main(["export", "stable-diffusion", "--checkpoint", str(tmp_path / "glide"), "--out",
                     str(tmp_path / "out")])
    one_line_error(code, capsys.readouterr().err, 1, "cannot be expressed as a Stable Diffusion folder")
    assert not (tmp_path / "out").exists()
    assert cli.main(["export", "stable-diffusion", "--help"]) == 0


def test_bad_folders_are_one_line(sd_folders, tmp_path, capsys):
    def convert(folder, out):
        return cli.main(["convert", "stable-diffusion", "--model", str(folder), "--out", str(tmp_path / out)])

    (tmp_path / "empty").mkdir()
    one_line_error(convert(tmp_path / "empty", "a"), capsys.readouterr().err, 1, "no model_index.json")
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                       "text_encoder_2": ["transformers", "CLIPTextModel"]}))
    one_line_error(convert(sdxl, "b"), capsys.readouterr().err, 1, "SDXL")
    broken = tmp_path / "no-vae"
    shutil.copytree(sd_folders["sd1"], broken)
    shutil.rmtree(broken / "vae")
    one_line_error(convert(broken, "c"), capsys.readouterr().err, 1, "no vae/ folder")
    shutil.copytree(sd_folders["sd1"] / "vae", broken / "vae")
    config = json.loads((broken / "unet" / "config.json").read_text())
    (broken / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    one_line_error(convert(broken, "d"), capsys.readouterr().err, 1, "addition_embed_type 'text_time'")
    (broken / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "ControlNetModel"}))
    one_line_error(convert(broken, "e"), capsys.readouterr().err, 1, "not a UNet2DConditionModel")
    assert not any((tmp_path / out).exists() for out in "abcde")
    assert cli.main(["convert", "stable-diffusion", "--help"]) == 0
