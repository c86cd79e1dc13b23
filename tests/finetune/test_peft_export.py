"""`mmgen export peft`: an mmgen LoRA adapter written as peft's adapter folder, put on the mmgen base by peft."""

import json

import torch
from peft import PeftModel

from mmgen.diffusion import tokenize_prompts
from mmgen.finetune import LoRAConfig, add_lora, save_adapter
from mmgen.finetune.peft_export import export_peft
from tests.diffusion.helpers import tiny_text2img
from tests.test_cli import one_line_error, run_cli


def trained_adapter(folder, method="lora"):
    """A tiny text2img model with LoRA on attention and convolutions, its B matrices random (as after training)."""
    model = tiny_text2img(0)
    add_lora(model, LoRAConfig(method=method, rank=2, alpha=3.0, targets=["attn", "conv"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(model, folder, base="runs/base")
    return model.eval()


def test_peft_puts_the_exported_adapter_on_the_base_exactly(tmp_path):
    adapted = trained_adapter(tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 3.0
    assert config["base_model_name_or_path"] == "runs/base"
    assert sorted(config["target_modules"]) == sorted(adapted.lora_state.layers)
    peft_model = PeftModel.from_pretrained(tiny_text2img(0), str(tmp_path / "peft")).eval()
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([7, 60])
    tokens = tokenize_prompts(["a red circle", "a blue star"], adapted.context_length)
    with torch.no_grad():
        expected = adapted(x, t, tokens)
        torch.testing.assert_close(peft_model(x, t, tokens), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tiny_text2img(0)(x, t, tokens), expected, atol=1e-3)  # the adapter matters


def test_export_peft_cli(tmp_path, capsys):
    assert run_cli(["export", "peft", "--help"], capsys)[0] == 0
    trained_adapter(tmp_path / "adapter")
    code, out, err = run_cli(["export", "peft", "--adapter", tmp_path / "adapter", "--out", tmp_path / "peft"], capsys)
    assert code == 0, err
    assert sorted(path.name for path in (tmp_path / "peft").iterdir()) == ["adapter_config.json",
                                                                           "adapter_model.safetensors"]
    tiny_text2img(0).save_pretrained(tmp_path / "model")
    code, _, err = run_cli(["export", "peft", "--adapter", tmp_path / "model", "--out", tmp_path / "x"], capsys)
    one_line_error(code, err, 1, "holds a full model, not an adapter")
    code, _, err = run_cli(["export", "peft", "--adapter", tmp_path / "peft", "--out", tmp_path / "x"], capsys)
    one_line_error(code, err, 1, "not an mmgen adapter")
    assert not (tmp_path / "x").exists()
