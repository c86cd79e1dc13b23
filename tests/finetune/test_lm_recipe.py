"""`mmgen finetune lm`: LoRA and full runs through the Trainer, exact resume from adapter checkpoints, --adapter,
merge-lora, and instruction tuning with a masked prompt."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mmgen
from mmgen import cli
from mmgen.data.instructions import IGNORE_INDEX, InstructionExamples, collate_instructions
from mmgen.finetune import load_adapter
from mmgen.recipes import lm
from mmgen.recipes.finetune_lm import response_loss
from mmgen.text import GPT
from mmgen.text.tokenizers import CharTokenizer
from tests.conftest import TINY_LM, make_corpus
from tests.finetune.helpers import FAST_TRAIN, write_yaml
from tests.test_cli import run_cli

TEMPLATE = "Q: {instruction}\nR: "


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny trained GPT (base/), its corpus and a LoRA fine-tuning config (lora.yaml)."""
    folder = tmp_path_factory.mktemp("finetune-lm")
    (folder / "corpus.txt").write_text(make_corpus())
    config = {name: dict(values) for name, values in TINY_LM.items()}
    config["data"]["path"] = str(folder / "corpus.txt")
    lm.train(write_yaml(folder / "lm.yaml", config), folder / "base", ["train.max_steps=2", "train.checkpoint_every=0"])
    write_yaml(folder / "lora.yaml", {"method": "lora", "lora": {"rank": 4, "alpha": 8, "targets": ["attn", "mlp"]},
                                      "data": {"path": str(folder / "corpus.txt")}, "train": FAST_TRAIN})
    return folder


def finetune(folder, out, *overrides, base="base"):
    args = ["finetune", "lm", "--config", folder / "lora.yaml", "--out", folder / out, *overrides]
    return cli.main([str(a) for a in args + (["--base", folder / base] if base else [])])


def test_lora_run_saves_adapters_and_resumes_exactly(folder):
    assert finetune(folder, "lora") == 0
    run = folder / "lora"
    assert sorted(p.name for p in (run / "final").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert {"adapter.safetensors", "optimizer.safetensors"} <= {p.name for p in (run / "checkpoints/step-2").iterdir()}
    assert json.loads((run / "final/adapter_config.json").read_text())["base"] == str(folder / "base")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/loss" in r] == [2, 4]
    # a crash after the step-2 checkpoint, then --resume: the Trainer's load_fn reads the adapter checkpoint back
    shutil.copytree(run, folder / "resumed")
    shutil.rmtree(folder / "resumed/final")
    shutil.rmtree(folder / "resumed/checkpoints/step-4", ignore_errors=True)
    assert cli.main(["finetune", "lm", "--resume", str(folder / "resumed")]) == 0
    whole, resumed = load_file(str(run / "final/adapter.safetensors")), load_file(
        str(folder / "resumed/final/adapter.safetensors"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_full_method_writes_a_model_folder_with_its_tokenizer(folder, capsys):
    assert finetune(folder, "full", "method=full", "train.max_steps=2", "train.checkpoint_every=0") == 0
    final = folder / "full" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert isinstance(mmgen.load(final), GPT)
    base, tuned = load_file(str(folder / "base/final/model.safetensors")), load_file(str(final / "model.safetensors"))
    assert not torch.equal(base["norm.weight"], tuned["norm.weight"])  # every weight trains
    assert "27,360 of 27,360 parameters trainable (100.00%)" in capsys.readouterr().out
    code, out, _ = run_cli(["sample", "lm", "--checkpoint", folder / "full", "--prompt", "KING", "--max-new-tokens", 5],
                           capsys)
    assert code == 0 and out.startswith("KING")


def test_adapter_sampling_equals_the_merged_model(folder, capsys):
    if not (folder / "lora" / "final").exists():
        assert finetune(folder, "lora") == 0
        capsys.readouterr()
    greedy = ["--prompt", "KING:", "--max-new-tokens", 12, "--temperature", 0]
    code, adapted, _ = run_cli(["sample", "lm", "--checkpoint", folder / "base", "--adapter", folder / "lora", *greedy],
                               capsys)
    assert code == 0
    code, out, _ = run_cli(["merge-lora", "--adapter", folder / "lora", "--out", folder / "merged"], capsys)
    assert code == 0 and sorted(p.name for p in (folder / "merged").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    merged = mmgen.load(folder / "merged")
    with_adapter = load_adapter(mmgen.load(folder / "base"), folder / "lora")
    tokens = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), with_adapter(tokens), atol=1e-4, rtol=1e-4)
        assert (with_adapter(tokens) - mmgen.load(folder / "base")(tokens)).abs().max() > 1e-4
    code, from_merged, _ = run_cli(["sample", "lm", "--checkpoint", folder / "merged", *greedy], capsys)
    assert from_merged == adapted
    code, _, err = run_cli(["merge-lora", "--adapter", folder / "lora", "--out", folder / "merged"], capsys)
    assert code == 1 and "already exists and is not empty" in err


def test_instruction_batches_mask_the_prompt_and_padding():
    tokenizer = CharTokenizer.train("abcdefgh QR:\n")
    pairs = [("abc", "defg"), ("a", "h")]
    examples = InstructionExamples(pairs, tokenizer, TEMPLATE, context_length=32, response_suffix="\n")
    batch = collate_instructions([examples[0], examples[1]])
    prompt = len(tokenizer.encode("Q: abc\nR: "))
    ids = tokenizer.encode("Q: abc\nR: defg\n")
    assert batch["inputs"][0].tolist() == ids[:-1]
    assert batch["targets"][0].tolist() == [IGNORE_INDEX] * (prompt - 1) + ids[prompt:]
    short = tokenizer.encode("Q: a\nR: h\n")
    assert batch["targets"][1].tolist() == [IGNORE_INDEX] * 7 + short[8:] + [IGNORE_INDEX] * (len(ids) - len(short))
    # the loss is the mean cross-entropy over exactly the response tokens
    torch.manual_seed(0)
    model = GPT(mmgen.text.GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, num_layers=1, num_heads=2,
                                     dim=16))
    logits = model(batch["inputs"])
    kept = batch["targets"] != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[kept], batch["targets"][kept])
    torch.testing.assert_close(response_loss(model, batch), expected)
    # a prompt that fills the context has nothing to learn: dropped; a long response is cut at the window
    cut = InstructionExamples([("abcdefgh" * 3, "a"), ("a", "defg" * 10)], tokenizer, TEMPLATE, context_length=16)
    assert cut.dropped == 1 and cut.truncated == 1 and len(cut[0][0]) == 17


def test_instruction_tuning_end_to_end_and_the_same_template_at_sampling(folder, capsys):
    lines = [{"instruction": word, "response": word.upper()} for word in ["king", "queen", "lord", "night"] * 4]
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    overrides = ["data.path=null", f"data.instructions={folder / 'pairs.jsonl'}", f"data.template={json.dumps(TEMPLATE)}",
                 "data.val_fraction=0.25", "train.max_steps=2", "train.checkpoint_every=0"]
    code, out, _ = run_cli(["finetune", "lm", "--base", folder / "base", "--config", folder / "lora.yaml", "--out",
                            folder / "instruct", *overrides], capsys)
    assert code == 0 and "12 instruction pairs for training, 4 held out" in out
    records = [json.loads(line) for line in (folder / "instruct/metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in r for r in records)
    code, out, _ = run_cli(["sample", "lm", "--checkpoint", folder / "base", "--adapter", folder / "instruct",
                            "--template", "Q: {instruction}\\nR: ", "--prompt", "king", "--max-new-tokens", 3], capsys)
    assert code == 0 and out.startswith("Q: king\nR: ")
    (folder / "template.txt").write_text(TEMPLATE)
    code, from_file, _ = run_cli(["sample", "lm", "--checkpoint", folder / "base", "--adapter", folder / "instruct",
                                  "--template-file", folder / "template.txt", "--prompt", "king", "--max-new-tokens",
                                  3], capsys)
    assert from_file == out


def test_qlora_run_writes_a_4bit_adapter_that_merges(folder, capsys):
    pytest.importorskip("bitsandbytes")
    assert finetune(folder, "qlora", "method=qlora", "lora.compute_dtype=float32") == 0
    adapter = json.loads((folder / "qlora/final/adapter_config.json").read_text())
    assert adapter["lora"]["method"] == "qlora" and adapter["lora"]["double_quant"] is True
    code, _, _ = run_cli(["merge-lora", "--adapter", folder / "qlora", "--out", folder / "qlora-merged"], capsys)
    assert code == 0
    base = mmgen.load(folder / "base")
    tokens = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = load_adapter(base, folder / "qlora")(tokens)
        torch.testing.assert_close(mmgen.load(folder / "qlora-merged")(tokens), adapted, atol=1e-4, rtol=1e-4)
