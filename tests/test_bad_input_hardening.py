"""Hostile or absurd input (issue 13): a YAML alias bomb, --out naming a file, nan/inf hyperparameters, a broken or
gigantic config.json, a malicious pickle, oddly typed weights. Each is one line on stderr and a non-zero exit, and
leaves nothing behind."""

import json
import pickle
import resource
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mmgen
from mmgen import memory
from mmgen.errors import CheckpointError
from mmgen.hub import MODEL_TYPES, model_class
from mmgen.memory import model_size
from mmgen.text.gpt import GPT, GPTConfig
from tests.test_cli import one_line_error, run_cli


def alias_bomb(levels: int = 9) -> str:
    """'Billion laughs': `levels` lines, each a list of 9 aliases of the line before (9**levels strings in all)."""
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for previous, name in zip("abcdefghijklmnopqrstuvwxyz", "bcdefghijklmnopqrstuvwxyz"[:levels - 1]):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.fixture
def gpt_folder(tmp_path):
    """A tiny GPT model folder."""
    folder = tmp_path / "gpt"
    GPT(GPTConfig(vocab_size=50, context_length=16, num_layers=1, num_heads=2, dim=16)).save_pretrained(folder)
    return folder


def edit_config_json(folder, change) -> None:
    path = folder / "config.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------- 1. YAML alias bomb
def test_alias_bomb_config_is_refused_before_expansion(tmp_path):
    """In a subprocess under a 4 GB address-space limit and a timeout: were the aliases expanded, the run would stop
    with a MemoryError (and fail here) instead of taking the machine's memory (3.5 GB after 40 s, and rising, before
    the fix)."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert len(bomb.read_bytes()) < 400
    limit = 4 << 30
    result = subprocess.run(
        [sys.executable, "-m", "mmgen.cli", "train", "lm", "--config", str(bomb), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    one_line_error(result.returncode, result.stderr, 2, "YAML aliases are not allowed in configs (line 2)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", [
    "x=[&a [1, 1, 1, 1, 1, 1, 1, 1, 1], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], [*b, *b, *b, *b, *b, *b, *b, *b]]",
    "x={a: &a [1, 2], b: *a}",
])
def test_alias_in_an_override_is_refused(tiny_lm_config, tmp_path, capsys, override):
    # the key is unknown, so even an expanding parser would fail here on the key, never expand the value
    code, _, err = run_cli(["train", "lm", "--config", tiny_lm_config, "--out", tmp_path / "run", override], capsys)
    one_line_error(code, err, 2, "override 'x': YAML aliases are not allowed in overrides")
    assert not (tmp_path / "run").exists()


def test_undefined_alias_override_stays_text(tiny_lm_config, tmp_path, capsys):
    """`key=*a` names no anchor: it is the text "*a", checked like any other value."""
    code, _, err = run_cli(["train", "lm", "--config", tiny_lm_config, "--out", tmp_path / "run", "train.lr=*a"],
                           capsys)
    one_line_error(code, err, 2, "config key 'train.lr' expects float, got '*a'")


# --------------------------------------------------------------------------------------- 2. --out naming a file
def test_train_out_naming_a_file(tiny_lm_config, tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    code, _, err = run_cli(["train", "lm", "--config", tiny_lm_config, "--out", existing], capsys)
    one_line_error(code, err, 1, f"{existing} is a file, not a folder")
    code, _, err = run_cli(["train", "lm", "--config", tiny_lm_config, "--out", existing / "run"], capsys)
    one_line_error(code, err, 1, f"{existing / 'run'} cannot be created: {existing} is a file, not a folder")
    assert existing.read_text() == "keep me"


def test_finetune_out_naming_a_file(gpt_folder, corpus_file, tmp_path, capsys):
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump({"method": "lora", "data": {"path": str(corpus_file)}}))
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    code, _, err = run_cli(["finetune", "lm", "--base", gpt_folder, "--config", config, "--out", existing], capsys)
    one_line_error(code, err, 1, f"{existing} is a file, not a folder")
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize("command", [
    ["sample", "text2img", "--checkpoint", "{model}", "--prompt", "a red circle"],
    ["sample", "variations", "--checkpoint", "{model}", "image.png"],
    ["convert", "gpt2", "--model", "{model}"],
    ["convert", "diffusers-vae", "--model", "{model}"],
    ["merge-lora", "--adapter", "{model}"],
])
def test_out_of_other_commands_naming_a_file(gpt_folder, tmp_path, capsys, command):
    """Checked before any model is read: --out under a file is refused, as is a file itself (convert replaced it)."""
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    command = [str(gpt_folder) if part == "{model}" else part for part in command]
    code, _, err = run_cli([*command, "--out", existing], capsys)
    one_line_error(code, err, 1, f"--out {existing} is a file, not a folder")
    code, _, err = run_cli([*command, "--out", existing / "out"], capsys)
    one_line_error(code, err, 1, f"cannot be created: {existing} is a file, not a folder")
    assert existing.read_text() == "keep me"


def test_convert_keeps_a_folder_that_holds_files(gpt_folder, tmp_path, capsys):
    """Before, `convert --out DIR` replaced DIR and deleted what it held."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["convert", "gpt2", "--model", gpt_folder, "--out", folder], capsys)
    one_line_error(code, err, 1, f"--out {folder} already exists and is not empty")
    assert [path.name for path in folder.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------------ 3. nan / inf floats
@pytest.mark.parametrize("override, key", [
    ("train.lr=.nan", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.lr=inf", "train.lr"),
    ("train.lr=.inf", "train.lr"),
    ("train.min_lr=.nan", "train.min_lr"),
    ("train.weight_decay=.nan", "train.weight_decay"),
    ("train.ema_decay=nan", "train.ema_decay"),
    ("train.grad_clip=.inf", "train.grad_clip"),
    ("train.betas=[.nan, 0.99]", "train.betas[0]"),
    ("model.dropout=.nan", "model.dropout"),
    ("train.lr=1" + "0" * 400, "train.lr"),  # an integer too large for a float
])
def test_non_finite_numbers_are_refused(tiny_lm_config, tmp_path, capsys, override, key):
    code, _, err = run_cli(["train", "lm", "--config", tiny_lm_config, "--out", tmp_path / "run", override], capsys)
    one_line_error(code, err, 2, f"config key {key!r} must be a finite number")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- 4. malformed config.json
@pytest.mark.parametrize("change, fragment", [
    (lambda meta: meta.update(model_type=["gpt"]), "unknown model_type ['gpt']"),
    (lambda meta: meta.update(model_type={"gpt": 1}), "unknown model_type {'gpt': 1}"),
    (lambda meta: meta.update(config=[1, 2]), '"config" must be an object of model settings, got list'),
    (lambda meta: meta.update(config="gpt"), '"config" must be an object of model settings, got str'),
    (lambda meta: meta.pop("config"), '"config" must be an object of model settings, got none'),
    (lambda meta: meta["config"].update(dim=float("nan")), "config key 'config.dim' expects int, got nan"),
    (lambda meta: meta["config"].update(dropout=float("inf")), "'config.dropout' must be a finite number, got inf"),
])
def test_malformed_config_json(gpt_folder, capsys, change, fragment):
    edit_config_json(gpt_folder, change)
    code, _, err = run_cli(["sample", "lm", "--checkpoint", gpt_folder, "--max-new-tokens", "2"], capsys)
    one_line_error(code, err, 1, fragment)


# ------------------------------------------------------------------------------------ 5. absurd model sizes
def test_absurd_config_json_is_refused_before_allocating(gpt_folder, capsys):
    """13 TB of weights: refused from the meta-device count (the real build died in the allocator with a traceback,
    and a model a little larger than RAM ran the machine out of memory)."""
    edit_config_json(gpt_folder, lambda meta: meta["config"].update(dim=10**6, num_layers=1000, num_heads=1000))
    code, _, err = run_cli(["sample", "lm", "--checkpoint", gpt_folder, "--max-new-tokens", "2"], capsys)
    one_line_error(code, err, 1, f"{gpt_folder / 'config.json'} implies at least 3,000,068,000,000 parameters")
    assert "GB of free memory" in err


def test_model_larger_than_free_memory_is_refused(gpt_folder, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": [("free memory", 100_000)])
    with pytest.raises(CheckpointError, match=r"implies at least [\d,]+ parameters .* more than the "
                                                           r"0\.000 GB of free memory"):
        mmgen.load(gpt_folder)
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": [("free memory", 10**9)])
    assert isinstance(mmgen.load(gpt_folder), GPT)


def test_too_many_layers_are_refused_quickly(gpt_folder, monkeypatch, capsys):
    """A billion tiny layers would take days to count: past MAX_TENSORS the build stops."""
    monkeypatch.setattr(memory, "MAX_TENSORS", 2_000)
    edit_config_json(gpt_folder, lambda meta: meta["config"].update(num_layers=10**9))
    code, _, err = run_cli(["sample", "lm", "--checkpoint", gpt_folder, "--max-new-tokens", "2"], capsys)
    one_line_error(code, err, 1, "implies more than 2,000 parameter and buffer tensors")


def test_meta_device_size_of_every_model_type():
    """Every registered model builds on the meta device, with the parameter count of the real model."""
    from mmgen.clip.classifier import CLIPClassifier, CLIPClassifierConfig
    from mmgen.diffusion import UNet, UNetConfig
    from mmgen.diffusion.vae import VAE, VAEConfig
    from mmgen.text.classifier import TextClassifier, TextClassifierConfig
    from mmgen.text.mlm import MaskedLM, MLMConfig
    from tests.clip.helpers import make_clip, tiny_config
    from tests.diffusion.helpers import TINY_UNET, tiny_text2img
    from tests.diffusion.unclip_helpers import tiny_decoder, tiny_prior

    models = {
        "gpt": GPT(GPTConfig(vocab_size=50, context_length=16, num_layers=2, num_heads=2, dim=16)),
        "clip": make_clip(0),
        "unet": UNet(UNetConfig(**TINY_UNET)),
        "vae": VAE(VAEConfig(base_channels=8, channel_multipliers=(1, 2), blocks_per_level=1, groups=4)),
        "text2img": tiny_text2img(),
        "prior": tiny_prior(),
        "decoder": tiny_decoder(),
        "clip-classifier": CLIPClassifier(CLIPClassifierConfig(["a", "b"], tiny_config())),
        "mlm": MaskedLM(MLMConfig(vocab_size=50, context_length=16, num_layers=2, num_heads=2, dim=16,
                                  type_vocab_size=2, norm_position="post")),
        "text-classifier": TextClassifier(TextClassifierConfig(["a", "b"], gpt=GPTConfig(
            vocab_size=50, context_length=16, num_layers=2, num_heads=2, dim=16))),
    }
    assert set(models) == set(MODEL_TYPES)
    for model_type, model in models.items():
        cls = model_class(model_type)
        size = model_size(lambda: cls(model.config))
        assert size.complete and size.parameters == sum(p.numel() for p in model.parameters()), model_type
        data_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        assert size.bytes == data_bytes + memory.BYTES_PER_TENSOR * size.tensors, model_type


# --------------------------------------------------------------------------------------- 6. malicious pickle
class _Payload:
    """Unpickling it calls open(marker, "w"): creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    alive = tmp_path / "payload-works"
    pickle.loads(pickle.dumps(_Payload(alive))).close()
    assert alive.exists()  # the payload does run under a plain pickle.load

    source, marker = tmp_path / "gpt2", tmp_path / "payload-ran"
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=None, eos_token_id=None)
    config.save_pretrained(source)
    (source / "pytorch_model.bin").write_bytes(pickle.dumps({"transformer.wte.weight": _Payload(marker)}))
    code, _, err = run_cli(["convert", "gpt2", "--model", source, "--out", tmp_path / "out"], capsys)
    one_line_error(code, err, 1, "pytorch_model.bin is a pickle that torch.load(weights_only=True) refuses")
    assert "safetensors" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ 7. oddly typed weights
@pytest.mark.parametrize("dtype, warned", [
    (torch.float64, "float64 tensor(s) cast to float32"),
    (torch.int8, "int8 tensor(s) cast to float32"),
    (torch.bfloat16, None),
    (torch.float16, None),
])
def test_unusual_weight_dtypes_warn_once(gpt_folder, dtype, warned):
    weights = gpt_folder / "model.safetensors"
    save_file({name: tensor.to(dtype) for name, tensor in load_file(str(weights)).items()}, str(weights))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mmgen.load(gpt_folder)
    assert next(model.parameters()).dtype == torch.float32
    messages = [str(warning.message) for warning in caught]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and str(weights) in messages[0] and warned in messages[0], messages
