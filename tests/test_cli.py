"""The `mmgen` command: train and sample an LM, and one clear line for every user error."""

import json
import subprocess
import sys

import pytest

from mmgen import cli
from mmgen.data import text as text_data


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def trained_run(tmp_path_factory, tiny_lm_config):
    run = tmp_path_factory.mktemp("runs") / "lm"
    assert cli.main(["train", "lm", "--config", str(tiny_lm_config), "--out", str(run), "train.max_steps=12"]) == 0
    return run


def test_train_then_sample(trained_run, capsys):
    code, out, _ = run_cli(["sample", "lm", "--checkpoint", trained_run, "--prompt", "KING:", "--max-new-tokens", 20,
                            "--seed", 3, "--num-samples", 2], capsys)
    assert code == 0
    samples = out.split("\n---------------\n")
    assert len(samples) == 2 and all(s.startswith("KING:") for s in samples)
    assert len(samples[0].rstrip("\n")) >= 5
    code, again, _ = run_cli(["sample", "lm", "--checkpoint", trained_run / "final", "--prompt", "KING:",
                              "--max-new-tokens", 20, "--seed", 3, "--num-samples", 2], capsys)
    assert again == out  # same seed, same text


def test_sample_with_stop_token_and_greedy(trained_run, capsys):
    code, out, _ = run_cli(["sample", "lm", "--checkpoint", trained_run, "--prompt", "K", "--temperature", 0,
                            "--max-new-tokens", 200, "--stop", "\n"], capsys)
    assert code == 0
    assert out.endswith("\n\n") and out.count("\n") == 2  # one line, stopped at its newline (+ print's newline)


def one_line_error(code, err, expected_code, fragment):
    assert code == expected_code
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.lrr=0.1", "unknown config key 'train.lrr'"),
        ("train.max_steps=ten", "'train.max_steps' expects int"),
        ("model.vocab_size=100", "model.vocab_size is set by the tokenizer"),
        ("train.mixed_precision=fp8", "'train.mixed_precision' must be one of"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, tiny_lm_config, capsys, override, fragment):
    code, _, err = run_cli(["train", "lm", "--config", tiny_lm_config, "--out", tmp_path / "r", override], capsys)
    one_line_error(code, err, 2, fragment)
    assert not (tmp_path / "r").exists()  # nothing written


def test_missing_and_empty_corpus(tmp_path, tiny_lm_config, capsys):
    code, _, err = run_cli(["train", "lm", "--config", tiny_lm_config, "--out", tmp_path / "r",
                            f"data.path={tmp_path / 'nope.txt'}"], capsys)
    one_line_error(code, err, 1, "file not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run_cli(["train", "lm", "--config", tiny_lm_config, "--out", tmp_path / "r", f"data.path={empty}"], capsys)
    one_line_error(code, err, 1, "is empty")
    assert not (tmp_path / "r").exists()


def test_no_corpus_and_no_network_says_how_to_supply_it(tmp_path, monkeypatch):
    monkeypatch.setattr(text_data, "_shared_copies", lambda: [])
    monkeypatch.setenv("MMGEN_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(text_data.urllib.request, "urlopen", offline)
    with pytest.raises(text_data.UserError, match="pass data.path=FILE"):
        text_data.read_corpus(None)
    assert not (tmp_path / "cache" / "tinyshakespeare.txt").exists()


def test_existing_run_dir_is_not_overwritten(trained_run, tiny_lm_config, capsys):
    before = (trained_run / "final" / "model.safetensors").read_bytes()
    code, _, err = run_cli(["train", "lm", "--config", tiny_lm_config, "--out", trained_run], capsys)
    one_line_error(code, err, 1, "already holds files")
    assert (trained_run / "final" / "model.safetensors").read_bytes() == before


def test_sample_bad_arguments(trained_run, capsys):
    base = ["sample", "lm", "--checkpoint", trained_run]
    code, _, err = run_cli(base + ["--max-new-tokens", 0], capsys)
    one_line_error(code, err, 2, "must be a positive integer")
    code, _, err = run_cli(base + ["--prompt", "KING~"], capsys)
    one_line_error(code, err, 1, "'~' is not in the model's vocabulary")
    code, _, err = run_cli(base + ["--prompt", ""], capsys)
    one_line_error(code, err, 1, "empty prompt")
    code, _, err = run_cli(base + ["--top-p", 1.5], capsys)
    one_line_error(code, err, 2, "must lie in (0, 1]")


def test_broken_checkpoints(tmp_path, trained_run, capsys):
    import shutil

    base = ["sample", "lm", "--max-new-tokens", 5, "--checkpoint"]
    code, _, err = run_cli(base + [tmp_path / "nowhere"], capsys)
    one_line_error(code, err, 1, "checkpoint not found")

    broken = tmp_path / "broken"
    shutil.copytree(trained_run / "final", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    code, _, err = run_cli(base + [broken], capsys)
    one_line_error(code, err, 1, "corrupt weights file")

    weights.unlink()
    code, _, err = run_cli(base + [broken], capsys)
    one_line_error(code, err, 1, "missing file")

    (broken / "config.json").write_text("{")
    code, _, err = run_cli(base + [broken], capsys)
    one_line_error(code, err, 1, "corrupt JSON file")

    (broken / "config.json").write_text(json.dumps({"model_type": "teapot"}))
    code, _, err = run_cli(base + [broken], capsys)
    one_line_error(code, err, 1, "unknown model_type 'teapot'")

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(base + [empty], capsys)
    one_line_error(code, err, 1, "holds no mmgen model")


def test_resume_without_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(["train", "lm", "--resume", tmp_path], capsys)
    one_line_error(code, err, 1, "not an mmgen run folder")


def test_console_script_help_and_exit_codes(tmp_path):
    for args in (["--help"], ["train", "lm", "--help"], ["sample", "lm", "--help"], ["convert", "gpt2", "--help"]):
        result = subprocess.run([sys.executable, "-m", "mmgen.cli", *args], capture_output=True, text=True)
        assert result.returncode == 0 and "usage: mmgen" in result.stdout
    result = subprocess.run([sys.executable, "-m", "mmgen.cli", "train", "lm", "--config", str(tmp_path / "x.yaml"),
                             "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"mmgen: error: config file not found: {tmp_path / 'x.yaml'}"


def test_convert_gpt2_folder(tmp_path, capsys):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import mmgen

    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=1, n_head=2,
                                          bos_token_id=None, eos_token_id=None)).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    code, _, _ = run_cli(["convert", "gpt2", "--model", tmp_path / "hf", "--out", tmp_path / "mm"], capsys)
    assert code == 0
    tokens = torch.randint(0, 40, (2, 12))
    torch.testing.assert_close(mmgen.load(tmp_path / "mm")(tokens), hf_model(tokens).logits, atol=1e-4, rtol=1e-4)
    code, _, err = run_cli(["convert", "gpt2", "--model", tmp_path / "nothing", "--out", tmp_path / "x"], capsys)
    one_line_error(code, err, 1, "not a transformers model folder")
