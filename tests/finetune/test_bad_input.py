"""Every fine-tuning mistake a user can make is one clear line, a non-zero exit, and no run folder left behind."""

import string
import sys

import pytest

from mmgen.finetune import LoRAConfig, add_lora, save_adapter
from mmgen.text.tokenizers import TOKENIZER_FILE, CharTokenizer
from tests.finetune.helpers import CASES, FAST_TRAIN, tiny_gpt, write_yaml
from tests.test_cli import one_line_error, run_cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """base/ (a tiny GPT with its tokenizer), clip/ (a CLIP), a CLIP adapter, an adapter of a wider GPT, a config."""
    folder = tmp_path_factory.mktemp("bad-input")
    tokenizer = CharTokenizer(string.printable[:61])
    tiny_gpt().save_pretrained(folder / "base", extra_files={TOKENIZER_FILE: tokenizer.to_json()})
    CASES["clip"].build().save_pretrained(folder / "clip")
    save_adapter(add_lora(CASES["clip"].build(), LoRAConfig(rank=2)), folder / "clip-adapter")
    save_adapter(add_lora(tiny_gpt(dim=32), LoRAConfig(rank=2)), folder / "wide-adapter")
    (folder / "corpus.txt").write_text(string.ascii_letters * 20)
    write_yaml(folder / "lora.yaml", {"method": "lora", "lora": {"rank": 2, "targets": ["qkv"]},
                                      "data": {"path": str(folder / "corpus.txt")}, "train": FAST_TRAIN})
    return folder


@pytest.mark.parametrize("override, code, fragment", [
    ("lora.targets=[kv]", 2, "LoRA target 'kv' matches no layer of this gpt model (targets it has: qkv, out"),
    ("lora.targets=[query]", 2, "unknown LoRA target 'query'"),
    ("lora.rank=0", 2, "rank must be a positive integer, got 0"),
    ("lora.rank=-4", 2, "rank must be a positive integer, got -4"),
    ("method=dora", 2, "'method' must be one of 'full' | 'lora' | 'qlora', got 'dora'"),
    ("lora.method=qlora", 2, "lora.method='qlora' conflicts with method='lora'; set method only"),
])
def test_bad_lora_configs(folder, capsys, override, code, fragment):
    result = run_cli(["finetune", "lm", "--base", folder / "base", "--config", folder / "lora.yaml",
                      "--out", folder / "run", override], capsys)
    one_line_error(result[0], result[2], code, fragment)
    assert not (folder / "run").exists()


@pytest.mark.parametrize("base, fragment", [
    (None, "--base CHECKPOINT is required: the run or model folder to fine-tune"),
    ("missing", "checkpoint not found"),
    ("clip", "holds a 'clip' model, not a 'gpt' one"),
])
def test_missing_or_wrong_base(folder, capsys, base, fragment):
    args = ["finetune", "lm", "--config", folder / "lora.yaml", "--out", folder / "run"]
    result = run_cli(args + (["--base", folder / base] if base else []), capsys)
    one_line_error(result[0], result[2], 1, fragment)
    assert not (folder / "run").exists()


def test_qlora_without_bitsandbytes(folder, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    result = run_cli(["finetune", "lm", "--base", folder / "base", "--config", folder / "lora.yaml",
                      "--out", folder / "run", "method=qlora"], capsys)
    one_line_error(result[0], result[2], 1, "qlora needs bitsandbytes: pip install")
    assert not (folder / "run").exists()


@pytest.mark.parametrize("adapter, fragment", [
    ("clip-adapter", "is an adapter for a 'clip' model, not this 'gpt' one"),
    ("wide-adapter", "was trained on another gpt base: dim is 32 in the adapter's base, 64 here"),
    ("base", "holds a full model, not an adapter (pass it as --checkpoint)"),
    ("missing", "adapter folder not found"),
])
def test_adapter_that_does_not_fit_the_checkpoint(folder, capsys, adapter, fragment):
    result = run_cli(["sample", "lm", "--checkpoint", folder / "base", "--adapter", folder / adapter,
                      "--max-new-tokens", 2], capsys)
    one_line_error(result[0], result[2], 1, fragment)


def test_adapter_of_another_model_type_on_clip_commands(folder, capsys, tmp_path):
    result = run_cli(["eval", "clip", "--checkpoint", folder / "clip", "--adapter", folder / "wide-adapter",
                      "--zeroshot-dir", "shapes", "--max-samples", 4], capsys)
    one_line_error(result[0], result[2], 1, "is an adapter for a 'gpt' model, not this 'clip' one")
    result = run_cli(["merge-lora", "--adapter", folder / "clip-adapter", "--out", tmp_path / "merged"], capsys)
    one_line_error(result[0], result[2], 1, "records no base model: name it with --base")
    result = run_cli(["merge-lora", "--adapter", folder / "clip-adapter", "--base", folder / "base",
                      "--out", tmp_path / "merged"], capsys)
    one_line_error(result[0], result[2], 1, "is an adapter for a 'clip' model, not this 'gpt' one")
    assert not (tmp_path / "merged").exists()


def test_bad_template(folder, capsys):
    result = run_cli(["sample", "lm", "--checkpoint", folder / "base", "--template", "no placeholder"], capsys)
    one_line_error(result[0], result[2], 1, "must contain {instruction} exactly once")
    result = run_cli(["finetune", "lm", "--base", folder / "base", "--config", folder / "lora.yaml",
                      "--out", folder / "run", "data.template=nothing"], capsys)
    one_line_error(result[0], result[2], 2, "template must contain {instruction} exactly once")
    result = run_cli(["finetune", "lm", "--base", folder / "base", "--config", folder / "lora.yaml",
                      "--out", folder / "run", f"data.instructions={folder / 'none.jsonl'}", "data.path=null"], capsys)
    one_line_error(result[0], result[2], 1, "instruction file not found")
    assert not (folder / "run").exists()


def test_an_adapter_run_given_where_a_model_belongs(folder, capsys):
    fragment = "holds a LoRA adapter, not a model: pass it as --adapter with its base as the checkpoint"
    result = run_cli(["sample", "lm", "--checkpoint", folder / "clip-adapter"], capsys)
    one_line_error(result[0], result[2], 1, fragment)
    result = run_cli(["finetune", "lm", "--base", folder / "clip-adapter", "--config", folder / "lora.yaml",
                      "--out", folder / "run"], capsys)
    one_line_error(result[0], result[2], 1, fragment)
