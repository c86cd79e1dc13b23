"""`mmgen export diffusers-lora`: a LoRA trained by `mmgen finetune diffusion` on a converted SD folder loads with
diffusers' `load_lora_weights` and changes diffusers' UNet exactly as mmgen's merged model; bad input is one line."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from mmgen import cli
from mmgen.finetune import add_lora, load_adapted, merge_adapter, save_adapter
from mmgen.finetune.diffusers_lora import DIFFUSERS_LORA_WEIGHTS
from mmgen.finetune.lora import LoRAConfig
from tests.diffusion.helpers import tiny_text2img
from tests.diffusion.test_stable_diffusion import write_sd_folder
from tests.finetune.helpers import FAST_TRAIN, tiny_gpt, write_yaml
from tests.test_cli import one_line_error, run_cli

RANK, ALPHA = 4, 12.0  # alpha != rank: the export must carry the scale 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(SD folder, adapter run, diffusers LoRA folder): an SD-2-like folder converted, LoRA-tuned on every target
    kind (fused q/k/v and k/v, out, GEGLU, convolutions) for a few steps, and exported."""
    root = tmp_path_factory.mktemp("sdlora")
    folder = write_sd_folder(root / "sd", "sd2")
    assert cli.main(["convert", "stable-diffusion", "--model", str(folder), "--out", str(root / "mm")]) == 0
    config = {"method": "lora", "lora": {"rank": RANK, "alpha": ALPHA, "targets": ["attn", "mlp", "conv"]},
              "data": {"train": "shapes:train:8", "val": None, "cache": True}, "samples": {"count": 0},
              "train": dict(FAST_TRAIN, max_steps=3, eval_every=3, checkpoint_every=3, log_every=3, lr=2e-2)}
    assert cli.main(["finetune", "diffusion", "--base", str(root / "mm"), "--config",
                     str(write_yaml(root / "lora.yaml", config)), "--out", str(root / "run")]) == 0
    assert cli.main(["export", "diffusers-lora", "--adapter", str(root / "run"), "--out", str(root / "lora")]) == 0
    return folder, root / "run", root / "lora"


def unet_output(unet, inputs):
    latents, t, states = inputs
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=states).sample


def test_load_lora_weights_changes_diffusers_as_the_merged_model(exported):
    folder, run, lora = exported
    generator = torch.Generator().manual_seed(7)
    inputs = (torch.randn(3, 4, 8, 8, generator=generator), torch.tensor([5, 480, 990]),
              torch.randn(3, 77, 32, generator=generator))
    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    base = unet_output(pipeline.unet, inputs)
    pipeline.load_lora_weights(lora)
    adapted = unet_output(pipeline.unet, inputs)
    merged = merge_adapter(load_adapted(run)).eval()
    with torch.no_grad():
        ours = merged.unet(inputs[0], inputs[1], context=inputs[2])
    torch.testing.assert_close(adapted, ours, atol=1e-4, rtol=0)
    assert (adapted - base).abs().max() > 100 * 1e-4  # the adapter moves the output far past the tolerance
    config = pipeline.unet.peft_config["default_0"]
    assert config.r == RANK and config.lora_alpha == RANK  # the scale alpha / rank is folded into B


def test_file_holds_diffusers_names_split_from_fused_layers(exported):
    _, run, lora = exported
    assert sorted(path.name for path in lora.iterdir()) == [DIFFUSERS_LORA_WEIGHTS]
    with safe_open(str(lora / DIFFUSERS_LORA_WEIGHTS), "pt") as weights:
        keys = set(weights.keys())
        metadata = json.loads(weights.metadata()["lora_adapter_metadata"])
        prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1."
        a_q, a_v = (weights.get_tensor(f"{prefix}{part}.lora_A.weight") for part in ("to_q", "to_v"))
        b_v = weights.get_tensor(f"{prefix}to_v.lora_B.weight")
    assert all(key.startswith("unet.") and (".lora_A." in key or ".lora_B." in key) for key in keys)
    assert metadata["unet.r"] == RANK and metadata["unet.lora_alpha"] == RANK
    adapter = load_adapted(run).unet.down_levels[0].stages[0].attention.block.attn.qkv_proj
    torch.testing.assert_close(a_q, adapter.lora_A["default"].weight, atol=0, rtol=0)  # A shared by q, k and v
    assert torch.equal(a_q, a_v)
    width = b_v.shape[0]
    torch.testing.assert_close(b_v, adapter.lora_B["default"].weight[2 * width:] * ALPHA / RANK)  # v: B's last rows
    assert any(".conv1.lora_A." in key for key in keys) and any(".ff.net.0.proj." in key for key in keys)
    assert any(".transformer_blocks.1.attn2.to_k." in key for key in keys)  # the second block of a depth-2 level


def test_bad_adapters_are_one_line(exported, tmp_path, capsys):
    _, run, _ = exported

    def export(adapter, out):
        return run_cli(["export", "diffusers-lora", "--adapter", adapter, "--out", tmp_path / out], capsys)

    qlora = tmp_path / "qlora"
    shutil.copytree(run / "final", qlora)
    meta = json.loads((qlora / "adapter_config.json").read_text())
    meta["lora"]["method"] = "qlora"
    (qlora / "adapter_config.json").write_text(json.dumps(meta))
    code, _, err = export(qlora, "a")
    one_line_error(code, err, 1, "is a qlora adapter, trained on a 4-bit base")
    glide = save_adapter(add_lora(tiny_text2img(), LoRAConfig(rank=2)), tmp_path / "glide")
    code, _, err = export(glide, "b")
    one_line_error(code, err, 1, "adapts a model Stable Diffusion's pipeline cannot express: pixel-space diffusion")
    gpt = save_adapter(add_lora(tiny_gpt(), LoRAConfig(rank=2)), tmp_path / "gpt")
    code, _, err = export(gpt, "c")
    one_line_error(code, err, 1, "adapts a gpt model: only text2img adapters export to diffusers")
    code, _, err = export(run.parent / "mm", "d")
    one_line_error(code, err, 1, "holds a full model, not an adapter")
    assert not any((tmp_path / out).exists() for out in "abcd")
    assert cli.main(["export", "diffusers-lora", "--help"]) == 0
