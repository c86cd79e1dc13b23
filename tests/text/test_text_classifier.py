"""Sequence classifiers on a GPT (last real token) and a masked LM (first / mean), `mmgen finetune text-classifier`
(full and LoRA) on a text,label table, its one-line errors, and the Tiny Shakespeare speakers rule."""

import json

import pytest
import torch
import yaml

import mmgen
from mmgen.data.speakers import speaker_splits
from mmgen.text.classifier import TextClassifier, TextClassifierConfig, pool
from mmgen.text.gpt import GPT, GPTConfig
from mmgen.text.mlm import MaskedLM, MLMConfig
from mmgen.text.tokenizers import CharTokenizer
from tests.test_cli import one_line_error, run_cli

CLASSES = ["KING", "LORD", "QUEEN"]
TINY = dict(vocab_size=30, context_length=16, num_layers=2, num_heads=2, dim=16)


def backbone(kind: str):
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY)) if kind == "gpt" else MaskedLM(MLMConfig(**TINY))


@pytest.mark.parametrize("kind,pooling", [("gpt", "last"), ("gpt", "mean"), ("mlm", "first"), ("mlm", "mean")])
def test_head_shapes_and_padding(kind, pooling):
    model = TextClassifier.from_backbone(backbone(kind), CLASSES, pooling).eval()
    assert model.config.pooling == pooling and model.backbone.lm_head is None
    tokens = torch.randint(0, 30, (2, 9))
    padded = torch.cat([tokens, torch.randint(0, 30, (2, 4))], dim=1)
    padding_mask = torch.zeros(2, 13, dtype=torch.bool)
    padding_mask[:, 9:] = True
    logits = model(padded, padding_mask)
    assert logits.shape == (2, 3)
    assert torch.allclose(logits, model(tokens), atol=1e-5)  # right padding changes nothing


def test_backbone_weights_are_copied_and_gpt_pools_the_last_real_token():
    gpt = backbone("gpt").eval()
    model = TextClassifier.from_backbone(gpt, CLASSES).eval()
    assert model.config.pooling == "last"
    tokens = torch.randint(0, 30, (1, 7))
    assert torch.equal(model.backbone.hidden_states(tokens), gpt.hidden_states(tokens))
    hidden = torch.randn(2, 5, 4)
    padding_mask = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    assert torch.equal(pool(hidden, padding_mask, "last"), torch.stack([hidden[0, 2], hidden[1, 4]]))
    assert torch.allclose(pool(hidden, padding_mask, "mean")[0], hidden[0, :3].mean(0))
    assert TextClassifier.from_backbone(backbone("mlm"), CLASSES).config.pooling == "mean"


@pytest.mark.parametrize("changes,fragment", [(dict(classes=["A"]), "at least two"),
                                              (dict(mlm=MLMConfig(**TINY)), "exactly one"),
                                              (dict(pooling="first"), "first token sees only itself")])
def test_config_refuses_impossible_classifiers(changes, fragment):
    options = dict(classes=CLASSES, pooling="last", gpt=GPTConfig(**TINY))
    options.update(changes)
    with pytest.raises(ValueError, match=fragment):
        TextClassifierConfig(**options)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """A tiny GPT and masked-LM base with char tokenizers, a text,label table and configs."""
    folder = tmp_path_factory.mktemp("text-classifier")
    tokenizer = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ,.", specials=("[MASK]",))
    for kind in ("gpt", "mlm"):
        base = backbone(kind)
        base.save_pretrained(folder / kind, extra_files={"tokenizer.json": tokenizer.to_json()})
    rows = [{"text": f"{word} {'the crown ' * (i % 3)}speaks", "label": label}
            for i in range(24) for word, label in (("king", "KING"), ("lord", "LORD"), ("queen", "QUEEN"))]
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    train = {"batch_size": 8, "max_steps": 6, "lr": 3e-3, "warmup_steps": 1, "eval_every": 3, "eval_batches": 2,
             "log_every": 3, "checkpoint_every": 0, "tensorboard": False, "progress": False, "seed": 3}
    for method in ("full", "lora"):
        config = {"method": method, "lora": {"rank": 2, "alpha": 4, "targets": ["attn"]},
                  "data": {"train": str(folder / "rows.jsonl"), "val_fraction": 0.25}, "train": train}
        (folder / f"{method}.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.mark.parametrize("kind,method", [("gpt", "full"), ("mlm", "lora")])
def test_finetune_writes_a_classifier_and_logs_held_out_accuracy(tables, kind, method, capsys):
    out = tables / f"run-{kind}-{method}"
    code, stdout, err = run_cli(["finetune", "text-classifier", "--base", tables / kind, "--config",
                                 tables / f"{method}.yaml", "--out", out], capsys)
    assert code == 0, err
    assert "3 classes, 54 training texts, 18 held out" in stdout
    model = mmgen.load(out)
    assert isinstance(model, TextClassifier) and model.config.classes == CLASSES
    assert (model.config.gpt is not None) == (kind == "gpt")
    assert not any(".lora_" in name for name in model.state_dict())  # a lora run saves the merged classifier
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [row for row in rows if "val/accuracy" in row]
    assert [row["step"] for row in evaluations] == [3, 6]
    assert all(row["val/majority_accuracy"] == pytest.approx(1 / 3) for row in evaluations)
    assert (out / "final" / "tokenizer.json").is_file()


def test_bad_tables_are_one_line(tables, capsys):
    (tables / "no-label.csv").write_text("text,speaker\nhello,KING\nthere,LORD\n")
    (tables / "one-class.csv").write_text("text,label\nhello,KING\nthere,KING\n")
    for table, fragment in (("no-label.csv", "no column 'label'"), ("one-class.csv", "at least two classes"),
                            ("missing.csv", "file not found")):
        code, _, err = run_cli(["finetune", "text-classifier", "--base", tables / "gpt", "--config",
                                tables / "full.yaml", "--out", tables / f"bad-{table}",
                                f"data.train={tables / table}"], capsys)
        one_line_error(code, err, 1, fragment)
        assert not (tables / f"bad-{table}").exists()
    for override, fragment in (("method=qlora", "not qlora"), ("pooling=first", "first token sees only itself")):
        code, _, err = run_cli(["finetune", "text-classifier", "--base", tables / "gpt", "--config",
                                tables / "full.yaml", "--out", tables / "bad-config", override], capsys)
        one_line_error(code, err, 2, fragment)
        assert not (tables / "bad-config").exists()


def test_speaker_rule_is_deterministic_and_holds_out_every_fifth_speech():
    text = "\n\n".join(f"{name}:\nline {i} of {name}\nmore" for i in range(10) for name in ("ANNE", "BOB", "CY"))
    text += "\n\nDAN:\nonce"
    train, held_out = speaker_splits(text, top=3, every=5)
    assert {row["label"] for row in train} == {"ANNE", "BOB", "CY"}  # DAN is not among the 3 most frequent
    assert len(held_out) == 6 and len(train) == 24
    assert held_out[0] == {"text": "line 4 of ANNE\nmore", "label": "ANNE"}
    assert speaker_splits(text, top=3, every=5) == (train, held_out)
