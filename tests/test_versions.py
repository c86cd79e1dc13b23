"""Every model folder and checkpoint records the mmgen that wrote it; a newer, unreadable format is one line."""

import json

import mmgen
from mmgen import cli
from mmgen.run_folder import FORMAT_VERSION, RunFolder
from mmgen.text import GPT, GPTConfig
from tests.test_cli import one_line_error, run_cli


def tiny_gpt():
    return GPT(GPTConfig(vocab_size=11, context_length=8, num_layers=1, num_heads=2, dim=16))


def rewrite(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_config_json_records_the_version_and_a_newer_format_is_refused_in_one_line(tmp_path, capsys):
    folder = tiny_gpt().save_pretrained(tmp_path / "gpt")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["mmgen_version"] == mmgen.__version__ and meta["format_version"] == FORMAT_VERSION
    mmgen.load(folder)  # its own format loads
    rewrite(folder / "config.json", format_version=FORMAT_VERSION + 1, mmgen_version="9.0.0")
    code, _, err = run_cli(["sample", "lm", "--checkpoint", folder, "--prompt", "a"], capsys)
    one_line_error(code, err, 1, f"was written by mmgen 9.0.0 in format {FORMAT_VERSION + 1}")
    assert "upgrade mmgen" in err
    rewrite(folder / "config.json", format_version="one")
    code, _, err = run_cli(["sample", "lm", "--checkpoint", folder, "--prompt", "a"], capsys)
    one_line_error(code, err, 1, "format_version must be an integer")


def test_a_folder_written_before_versions_were_recorded_still_loads(tmp_path):
    folder = tiny_gpt().save_pretrained(tmp_path / "gpt")
    meta = json.loads((folder / "config.json").read_text())
    del meta["mmgen_version"], meta["format_version"]
    (folder / "config.json").write_text(json.dumps(meta))
    assert isinstance(mmgen.load(folder), GPT)


def test_checkpoints_record_the_version_and_resume_refuses_a_newer_format(tmp_path, tiny_lm_config, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "lm", "--config", str(tiny_lm_config), "--out", str(run), "train.max_steps=10",
                     "train.checkpoint_every=5"]) == 0
    state_file = RunFolder(run).latest() / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["mmgen_version"] == mmgen.__version__ and state["format_version"] == FORMAT_VERSION
    rewrite(state_file, format_version=FORMAT_VERSION + 1)
    capsys.readouterr()
    code, _, err = run_cli(["train", "lm", "--resume", run, "train.max_steps=12"], capsys)
    one_line_error(code, err, 1, f"in format {FORMAT_VERSION + 1}; this mmgen")
