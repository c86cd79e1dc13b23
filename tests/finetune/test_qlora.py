"""QLoRA on CPU: 4-bit NF4 base layers from bitsandbytes, frozen, with peft LoRA on top."""

import copy
import sys

import pytest
import torch

import mmgen
from mmgen.errors import UserError
from mmgen.finetune import (
    LoRAConfig,
    add_lora,
    load_adapter,
    merge_adapter,
    quantized_weight_bytes,
    save_adapter,
    trainable_fraction,
)
from tests.finetune.helpers import CASES, output, train_steps


def test_qlora_without_bitsandbytes_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    model = CASES["gpt"].build()
    with pytest.raises(UserError, match=r"^qlora needs bitsandbytes: pip install") as error:
        add_lora(model, LoRAConfig(method="qlora"))
    assert "\n" not in str(error.value)


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("double_quant", [True, False])
def test_block_linears_become_frozen_4bit_weights(bnb, double_quant):
    case = CASES["gpt"]
    base = case.build()
    model = add_lora(copy.deepcopy(base), LoRAConfig(method="qlora", rank=4, targets=["qkv"], double_quant=double_quant))
    quantized = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    block_linears = {name for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)
                     and name.startswith("transformer.blocks.")}
    # targeted layers sit inside peft's wrapper as base_layer; the others are replaced as they are
    assert {name.replace(".base_layer", "") for name in quantized} == block_linears
    for name in quantized:
        weight = model.get_submodule(name).weight
        assert weight.dtype == torch.uint8 and not weight.requires_grad
        assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested == double_quant
    stored, as_fp32 = quantized_weight_bytes(model)
    assert as_fp32 == 4 * sum(base.get_submodule(name).weight.numel() for name in block_linears)
    assert stored <= 0.30 * as_fp32
    assert 0 < trainable_fraction(model) < 0.1
    # the 4-bit model stays close to the base: NF4 error, not garbage
    assert torch.nn.functional.cosine_similarity(output(model, case).flatten(), output(base, case).flatten(), 0) > 0.99


def test_qlora_trains_only_lora_and_merges_to_a_plain_model(bnb, tmp_path):
    case = CASES["gpt"]
    model = add_lora(case.build(), LoRAConfig(method="qlora", rank=4, targets=["attn", "mlp"]))
    assert all(".lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    packed = {name: p.detach().clone() for name, p in model.named_parameters() if p.dtype == torch.uint8}
    before = output(model, case)  # an eval-mode forward first: training must still work after it
    train_steps(model, case)
    gradients_of_base = [p.grad for p in model.parameters() if not p.requires_grad]
    assert all(grad is None for grad in gradients_of_base)
    for name, parameter in model.named_parameters():
        if name in packed:
            assert torch.equal(parameter, packed[name])  # the 4-bit base did not move
    adapted = output(model, case)
    assert (adapted - before).abs().max() > 1e-3
    restored = load_adapter(case.build(), save_adapter(model, tmp_path / "adapter"))  # quantised as in training
    torch.testing.assert_close(output(restored, case), adapted, atol=0, rtol=0)
    merged = merge_adapter(model)
    assert not any(isinstance(module, bnb.nn.Linear4bit) for module in merged.modules())
    torch.testing.assert_close(output(merged, case), adapted, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(output(mmgen.load(tmp_path / "merged"), case), adapted, atol=1e-4, rtol=1e-4)


def test_qlora_on_text2img_quantises_the_unet_only(bnb):
    case = CASES["text2img"]
    model = add_lora(case.build(), LoRAConfig(method="qlora", rank=2, targets=["q", "kv"], compute_dtype="bfloat16"))
    quantized = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert quantized and all(name.startswith("unet.") for name in quantized)
    assert all(model.get_submodule(name).compute_dtype == torch.bfloat16 for name in quantized)
    train_steps(model, case, steps=1)
    assert all(p.grad is None for p in model.text_encoder.parameters())
