"""`mmgen finetune diffusion`: LoRA on the UNet (with EMA) teaching an extra shape, sampling with --adapter."""

import json

import numpy as np
from PIL import Image
from safetensors.torch import load_file

import mmgen
from mmgen import cli
from mmgen.diffusion import TextToImage
from tests.finetune.helpers import CASES, FAST_TRAIN, write_yaml
from tests.test_cli import run_cli


def test_diffusion_adapter_run_samples_and_merges(tmp_path, capsys):
    CASES["text2img"].build().save_pretrained(tmp_path / "base")
    config = {"method": "lora", "lora": {"rank": 2, "targets": ["attn", "conv"]},
              "data": {"train": "shapes:train:32:extra=heart", "val": None, "cache": True},
              "samples": {"prompts": ["a red heart"], "count": 1, "steps": 2},
              "train": dict(FAST_TRAIN, ema_decay=0.9)}
    assert cli.main(["finetune", "diffusion", "--base", str(tmp_path / "base"), "--config",
                     str(write_yaml(tmp_path / "diffusion.yaml", config)), "--out", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "final").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert (run / "checkpoints/step-2/ema.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples/grid"] for r in records if "samples/grid" in r] == ["samples/step-2.png", "samples/step-4.png"]
    adapter = load_file(str(run / "final/adapter.safetensors"))
    assert adapter and all(name.startswith("unet.") for name in adapter)  # the text encoder is not adapted
    capsys.readouterr()
    for name, extra in (("with-adapter", ["--adapter", run]), ("base-only", [])):
        code, _, _ = run_cli(["sample", "text2img", "--checkpoint", tmp_path / "base", "--prompt", "a red heart",
                              "--n", 1, "--steps", 2, "--out", tmp_path / name, *extra], capsys)
        assert code == 0
    adapted, plain = (np.asarray(Image.open(tmp_path / name / "000.png")) for name in ("with-adapter", "base-only"))
    assert not np.array_equal(adapted, plain)
    assert json.loads((tmp_path / "with-adapter/samples.json").read_text())["adapter"] == str(run)
    code, _, _ = run_cli(["merge-lora", "--adapter", run, "--out", tmp_path / "merged"], capsys)
    assert code == 0 and isinstance(mmgen.load(tmp_path / "merged"), TextToImage)
