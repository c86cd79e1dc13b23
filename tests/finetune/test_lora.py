"""LoRA through peft on GPT, CLIP, the UNet and text2img: targets, frozen base, start at the base, merge."""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from mmgen.config import from_dict
from mmgen.errors import ConfigError
from mmgen.finetune import (
    LoRAConfig,
    add_lora,
    layers_by_target,
    merge_adapter,
    parameter_counts,
    summary,
    target_layers,
    trainable_fraction,
)
from mmgen.training import parameter_groups
from tests.finetune.helpers import CASES, output, tiny_gpt, train_steps

TARGETS = {  # per model: what to adapt in these tests
    "gpt": ["attn", "mlp"],
    "clip": ["qkv", "out"],
    "unet": ["attn", "conv"],
    "text2img": ["attn"],
}


def lora_layers(model):
    return {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def expected_lora_parameters(base, layers, rank):
    """rank * (inputs + outputs) per Linear; rank * in * k * k + out * rank per Conv2d (B is a 1x1 conv)."""
    count = 0
    for name in layers:
        module = base.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            count += rank * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            count += module.out_channels * rank
        else:
            count += rank * (module.in_features + module.out_features)
    return count


@pytest.mark.parametrize("kind", list(CASES))
def test_only_adapters_train_and_the_adapted_model_starts_at_its_base(kind):
    case = CASES[kind]
    base = case.build()
    model = add_lora(copy.deepcopy(base), LoRAConfig(rank=4, targets=TARGETS[kind]))
    layers = target_layers(base, TARGETS[kind])
    assert lora_layers(model) == set(layers)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    lora = expected_lora_parameters(base, layers, 4)
    assert parameter_counts(model) == (lora, parameter_counts(base)[1] + lora)
    assert 0 < trainable_fraction(model) < 0.2  # tiny models: the UNet (8 base channels) is the largest share
    assert "rank 4" in summary(model)
    # the Trainer's optimizer sees exactly the LoRA matrices
    grouped = [p for group in parameter_groups(model, 0.1) for p in group["params"]]
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}
    torch.testing.assert_close(output(model, case), output(base, case), atol=0, rtol=0)  # B = 0 at the start


@pytest.mark.parametrize("kind", list(CASES))
def test_training_moves_the_output_and_merging_keeps_it(kind):
    case = CASES[kind]
    base = case.build()
    frozen_before = {name for name, p in base.named_parameters() if not p.requires_grad}
    model = add_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, targets=TARGETS[kind]))
    train_steps(model, case)
    adapted = output(model, case)
    assert (adapted - output(base, case)).abs().max() > 1e-3
    merged = merge_adapter(model)
    assert not lora_layers(merged) and not hasattr(merged, "peft_config")
    assert merged.state_dict().keys() == base.state_dict().keys()
    assert {name for name, p in merged.named_parameters() if not p.requires_grad} == frozen_before
    torch.testing.assert_close(output(merged, case), adapted, atol=1e-4, rtol=1e-4)


def test_text2img_adapts_only_its_unet():
    case = CASES["text2img"]
    model = add_lora(case.build(), LoRAConfig(rank=2, targets=["attn", "mlp", "conv"]))
    assert lora_layers(model) and all(name.startswith("unet.") for name in lora_layers(model))
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_targets_select_the_same_layers_as_peft_suffix_matching():
    """peft's own target_modules matching (name suffixes) is the oracle for the friendly names."""
    suffixes = {"qkv": ["qkv_proj"], "out": ["out_proj"], "mlp_in": ["fc_in", "fc_gate"], "mlp_out": ["fc_out"]}
    gpt = tiny_gpt(mlp="swiglu")
    for target, names in suffixes.items():
        oracle = inject_adapter_in_model(LoraConfig(r=2, target_modules=names), copy.deepcopy(gpt))
        assert set(target_layers(gpt, [target])) == lora_layers(oracle), target
    unet = CASES["text2img"].build().unet
    oracle = inject_adapter_in_model(LoraConfig(r=2, target_modules=["qkv_proj", "q_proj", "kv_proj", "out_proj"]),
                                     copy.deepcopy(unet))
    assert {"unet." + name for name in lora_layers(oracle)} == set(target_layers(CASES["text2img"].build(), ["attn"]))
    found = layers_by_target(CASES["unet"].build())
    assert found["conv"] and found["q"] == [] and len(found["qkv"]) == len(found["out"])


def test_bad_configs_are_one_line_errors():
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="lora.*rank must be a positive integer, got -2"):
        from_dict(LoRAConfig, {"rank": -2}, "lora.")
    with pytest.raises(ValueError, match="unknown LoRA target 'query'.*known: qkv, q, kv, out"):
        LoRAConfig(targets=["query"])
    with pytest.raises(ConfigError, match="'lora.method' must be one of"):
        from_dict(LoRAConfig, {"method": "dora"}, "lora.")
    gpt = tiny_gpt()
    with pytest.raises(ConfigError, match="LoRA target 'kv' matches no layer of this gpt model .*targets it has: qkv"):
        add_lora(gpt, LoRAConfig(targets=["qkv", "kv"]))
    assert not lora_layers(gpt) and all(p.requires_grad for p in gpt.parameters())  # left untouched
    with pytest.raises(ConfigError, match="'conv' matches no layer of this clip model"):
        add_lora(CASES["clip"].build(), LoRAConfig(targets=["conv"]))
    add_lora(gpt, LoRAConfig())
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        add_lora(gpt, LoRAConfig())
    with pytest.raises(ConfigError, match="has no LoRA adapter"):
        merge_adapter(tiny_gpt())
