"""`mmgen train mlm` and `mmgen sample mlm` end to end on a tiny corpus, their --help, and their one-line errors."""

import json

import pytest
import yaml

import mmgen
from mmgen import cli
from mmgen.text.gpt import GPT, GPTConfig
from mmgen.text.mlm import MaskedLM
from mmgen.text.tokenizers import load_tokenizer
from tests.conftest import TINY_LM, make_corpus
from tests.test_cli import one_line_error, run_cli


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
    """A tiny masked LM trained for a few steps, its folder and its config."""
    folder = tmp_path_factory.mktemp("mlm")
    (folder / "corpus.txt").write_text(make_corpus())
    config = {name: dict(values) for name, values in TINY_LM.items()}
    config["data"]["path"] = str(folder / "corpus.txt")
    config["masking"] = {"probability": 0.15}
    (folder / "mlm.yaml").write_text(yaml.safe_dump(config))
    code = cli.main(["train", "mlm", "--config", str(folder / "mlm.yaml"), "--out", str(folder / "run"),
                     "train.max_steps=10", "train.eval_every=5", "train.checkpoint_every=0"])
    assert code == 0
    return folder


@pytest.mark.parametrize("command", [["train", "mlm"], ["sample", "mlm"], ["convert", "bert"],
                                     ["finetune", "text-classifier"]])
def test_help(command, capsys):
    code, out, _ = run_cli([*command, "--help"], capsys)
    assert code == 0 and "usage: mmgen " + " ".join(command) in out


def test_train_writes_a_masked_lm_with_a_mask_token_and_logs_masked_accuracy(mlm_run):
    run = mlm_run / "run"
    model = mmgen.load(run)
    tokenizer = load_tokenizer(run / "final")
    assert isinstance(model, MaskedLM) and model.config.vocab_size == tokenizer.vocab_size
    assert tokenizer.decode(tokenizer.encode("the [MASK] king")) == "the [MASK] king"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [row for row in rows if "val/masked_accuracy" in row]
    assert [row["step"] for row in evaluations] == [5, 10]
    for row in evaluations:
        assert 0.0 <= row["val/masked_accuracy"] <= 1.0 and 0.0 < row["val/unigram_accuracy"] < 1.0
        assert "val/loss" in row


def test_sample_prints_top_k_fills_for_each_mask(mlm_run, capsys):
    code, out, err = run_cli(["sample", "mlm", "--checkpoint", mlm_run / "run", "--text", "the [MASK]ing [MASK]",
                              "--top-k", "3"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["[MASK] 1", "[MASK] 2"]
    probabilities = [float(part.rsplit(" ", 1)[1]) for part in lines[0].split(": ", 1)[1].split(", ")]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)


@pytest.mark.parametrize("text,fragment", [("no mask here", "no [MASK] to fill in"),
                                           ("the [MASK] " + "king " * 10, "tokens long"),
                                           ("the [MASK] \u00e9", "not in the model's vocabulary")])
def test_sample_errors_are_one_line(mlm_run, capsys, text, fragment):
    code, _, err = run_cli(["sample", "mlm", "--checkpoint", mlm_run / "run", "--text", text], capsys)
    one_line_error(code, err, 1, fragment)


def test_sample_refuses_a_gpt(tmp_path, capsys):
    GPT(GPTConfig(vocab_size=20, context_length=8, num_layers=1, num_heads=2, dim=16)).save_pretrained(tmp_path / "gpt")
    code, _, err = run_cli(["sample", "mlm", "--checkpoint", tmp_path / "gpt", "--text", "a [MASK]"], capsys)
    one_line_error(code, err, 1, "not a masked language model")


def test_bad_config_key_is_one_line(mlm_run, capsys):
    code, _, err = run_cli(["train", "mlm", "--config", mlm_run / "mlm.yaml", "--out", mlm_run / "bad",
                            "masking.probability=1.5"], capsys)
    one_line_error(code, err, 2, "probability must lie in (0, 1]")
