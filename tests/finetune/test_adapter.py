"""Adapter folders: only the LoRA weights, a round trip, a pointer to the base, clear errors on another base."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import mmgen
from mmgen.errors import CheckpointError, ConfigError
from mmgen.finetune import LoRAConfig, add_lora, load_adapted, load_adapter, merge_adapter, save_adapter
from tests.finetune.helpers import CASES, output, tiny_gpt, train_steps


def trained_adapter(kind, targets=("attn",)):
    case = CASES[kind]
    base = case.build()
    model = add_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, targets=list(targets)))
    train_steps(model, case)
    return base, model


@pytest.mark.parametrize("kind, targets", [("gpt", ["attn", "mlp"]), ("text2img", ["attn", "conv"])])
def test_round_trip_writes_only_the_adapter(tmp_path, kind, targets):
    base, model = trained_adapter(kind, targets)
    folder = save_adapter(model, tmp_path / "adapter", base="runs/base")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    saved = load_file(str(folder / "adapter.safetensors"))
    lora = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(saved) == len(lora) and all(".lora_A." in n or ".lora_B." in n for n in saved)
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["model_type"] == kind and meta["base"] == "runs/base" and meta["lora"]["rank"] == 4
    restored = load_adapter(copy.deepcopy(base), folder)
    torch.testing.assert_close(output(restored, CASES[kind]), output(model, CASES[kind]), atol=0, rtol=0)
    # an adapted model with the same config takes new adapter weights in place (how a run would resume)
    fresh = add_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, targets=targets))
    torch.testing.assert_close(output(load_adapter(fresh, folder), CASES[kind]), output(model, CASES[kind]))


def test_merged_model_saves_and_loads_as_a_plain_model(tmp_path):
    base, model = trained_adapter("gpt")
    adapted = output(model, CASES["gpt"])
    merge_adapter(model).save_pretrained(tmp_path / "merged")
    loaded = mmgen.load(tmp_path / "merged")
    torch.testing.assert_close(output(loaded, CASES["gpt"]), adapted, atol=1e-4, rtol=1e-4)


def test_load_adapted_finds_the_recorded_base(tmp_path):
    base, model = trained_adapter("gpt")
    base.save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "adapter", base=str(tmp_path / "base"))
    torch.testing.assert_close(output(load_adapted(tmp_path / "adapter"), CASES["gpt"]), output(model, CASES["gpt"]))
    save_adapter(model, tmp_path / "anonymous")
    with pytest.raises(CheckpointError, match="records no base model"):
        load_adapted(tmp_path / "anonymous")
    assert isinstance(load_adapted(tmp_path / "anonymous", base=tmp_path / "base"), type(base))


def test_an_adapter_on_another_base_is_a_clear_error(tmp_path):
    _, model = trained_adapter("gpt")
    folder = save_adapter(model, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="another gpt base: dim is 64 in the adapter's base, 32 here"):
        load_adapter(tiny_gpt(dim=32), folder)
    with pytest.raises(CheckpointError, match="another gpt base: num_layers is 2 .* 3 here"):
        load_adapter(tiny_gpt(num_layers=3), folder)
    with pytest.raises(CheckpointError, match="adapter for a 'gpt' model, not this 'clip' one"):
        load_adapter(CASES["clip"].build(), folder)
    different_config = add_lora(tiny_gpt(), LoRAConfig(rank=2))
    with pytest.raises(CheckpointError, match="already carries a LoRA adapter with another config"):
        load_adapter(different_config, folder)
    with pytest.raises(CheckpointError, match="adapter folder not found"):
        load_adapter(tiny_gpt(), tmp_path / "missing")
    (folder / "adapter.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt weights file"):
        load_adapter(tiny_gpt(), folder)


def test_saving_without_an_adapter_leaves_the_old_folder(tmp_path):
    _, model = trained_adapter("gpt")
    folder = save_adapter(model, tmp_path / "adapter")
    before = (folder / "adapter.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="has no LoRA adapter"):
        save_adapter(tiny_gpt(), folder)
    assert (folder / "adapter.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging folder left behind
