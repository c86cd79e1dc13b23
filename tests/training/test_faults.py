"""Fault injection: kill -9 during checkpoint writes, Ctrl-C / SIGTERM mid-step, NaN, a full disk, two runs in one
folder. Each must lose at most the work since the last checkpoint, leave nothing half-written, and say so in one line.
"""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mmgen
from mmgen import cli
from mmgen.errors import UserError
from mmgen.recipes import lm
from mmgen.run_folder import RunFolder
from mmgen.training.interrupts import EXIT_INTERRUPTED, EXIT_PREEMPTED, Interrupted
from tests.conftest import TINY_LM, make_corpus
from tests.locks import lock_held_elsewhere

# dropout, EMA and accumulation 2: the RNG, the EMA and the half-accumulated step must all resume exactly
EXACT = ["model.dropout=0.2", "train.ema_decay=0.9", "train.grad_accum_steps=2", "train.checkpoint_every=5",
         "train.keep_checkpoints=2"]


def final_weights(run):
    return load_file(str(run / "final" / "model.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def leftovers(run):
    """Temporary files or folders anywhere in the run."""
    return [path for path in run.rglob("*") if ".tmp" in path.name or path.name.endswith(".old")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Final weights of the tiny LM run with EXACT, never interrupted (the tiny_lm_config fixture's recipe)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    corpus = folder / "corpus.txt"
    corpus.write_text(make_corpus())
    config = {section: dict(values) for section, values in TINY_LM.items()}
    config["data"]["path"] = str(corpus)
    (folder / "tiny-lm.yaml").write_text(yaml.safe_dump(config))
    lm.train(folder / "tiny-lm.yaml", folder / "run", EXACT)
    return final_weights(folder / "run")


# ---------------------------------------------------------------------------- kill -9 during checkpoint writes
KILLER = textwrap.dedent("""
    import os, signal, sys
    point, count = sys.argv[1], int(sys.argv[2])
    calls = [0]

    def kill_on_call(function, should=lambda *a, **k: True):
        def wrapper(*args, **kwargs):
            if should(*args, **kwargs):
                calls[0] += 1
                if calls[0] == count:
                    os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return wrapper

    import mmgen.io, mmgen.run_folder, mmgen.training.checkpoint
    if point == "weights":  # in the middle of writing a checkpoint's files
        mmgen.training.checkpoint.save_tensors = kill_on_call(mmgen.training.checkpoint.save_tensors)
    elif point == "publish":  # the staging folder is complete, not yet renamed
        RunFolder = mmgen.run_folder.RunFolder
        RunFolder.publish_checkpoint = kill_on_call(RunFolder.publish_checkpoint)
    elif point == "prune":  # an old checkpoint renamed away, not yet deleted
        mmgen.run_folder.shutil.rmtree = kill_on_call(mmgen.run_folder.shutil.rmtree,
                                                      lambda path, **k: str(path).endswith(".old"))
    elif point == "final":  # final/ written to its temporary folder, not yet renamed
        mmgen.io.os.replace = kill_on_call(mmgen.io.os.replace, lambda source, target: str(target).endswith("final"))
    from mmgen.cli import main
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("point, count", [("weights", 4), ("publish", 2), ("prune", 1), ("final", 1)])
def test_kill_9_while_writing_loses_nothing_and_resume_matches(tmp_path, tiny_lm_config, uninterrupted, point, count):
    run = tmp_path / "killed"
    command = [sys.executable, "-c", KILLER, point, str(count), "train", "lm", "--config", str(tiny_lm_config),
               "--out", str(run), *EXACT]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    latest = RunFolder(run).latest()
    if latest is not None:  # whatever is named step-N is whole and loads
        assert torch.isfinite(mmgen.load(latest).lm_head.weight).all()
    lm.train(None, run, resume=True)  # removes what the kill left behind and finishes the run
    assert not leftovers(run)
    assert_same(final_weights(run), uninterrupted)


# ---------------------------------------------------------------------------- Ctrl-C / SIGTERM / SIGUSR1
@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGINT, EXIT_INTERRUPTED),
                                                      (signal.SIGTERM, EXIT_PREEMPTED),
                                                      (signal.SIGUSR1, EXIT_PREEMPTED)])
def test_a_signal_mid_step_checkpoints_at_the_step_boundary_and_resume_is_exact(
        tmp_path, tiny_lm_config, uninterrupted, monkeypatch, signal_number, exit_code):
    from mmgen.text.gpt import GPT

    forward, calls = GPT.forward, [0]

    def forward_then_signal(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 15:  # the first micro-batch of step 8 (2 per step; step 5's checkpoint is behind)
            os.kill(os.getpid(), signal_number)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward_then_signal)
    run = tmp_path / "stopped"
    with pytest.raises(Interrupted) as stopped:
        lm.train(tiny_lm_config, run, EXACT)
    assert stopped.value.exit_code == exit_code
    assert "step 8" in str(stopped.value) and f"--resume {run}" in str(stopped.value)
    assert RunFolder(run).latest().name == "step-8" and not (run / "final").exists()
    monkeypatch.setattr(GPT, "forward", forward)
    lm.train(None, run, resume=True)
    assert_same(final_weights(run), uninterrupted)


@pytest.mark.slow
def test_sigterm_from_outside_exits_75_with_one_line_and_the_run_resumes(tmp_path, tiny_lm_config):
    run = tmp_path / "preempted"
    command = [sys.executable, "-m", "mmgen.cli", "train", "lm", "--config", str(tiny_lm_config), "--out", str(run),
               "train.max_steps=100000", "train.checkpoint_every=0", "train.eval_every=0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and f"--resume {run}" in lines[0], stderr
    latest = RunFolder(run).latest()
    assert latest is not None and torch.isfinite(mmgen.load(latest).lm_head.weight).all()
    steps = RunFolder.read_state(latest)["step"] + 2
    assert cli.main(["train", "lm", "--resume", str(run), f"train.max_steps={steps}"]) == 0


# ---------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("every_step", [True, False], ids=["cpu-check-every-step", "accelerator-check-at-log-steps"])
def test_a_nan_loss_stops_without_writing_and_keeps_the_last_good_checkpoint(tmp_path, tiny_lm_config, monkeypatch,
                                                                             every_step):
    from mmgen.training import trainer as trainer_module

    loss_fn, calls = lm.next_token_loss, [0]

    def loss_turning_nan(model, batch):
        calls[0] += model.training  # training steps only, not validation batches
        loss = loss_fn(model, batch)
        return loss * float("nan") if calls[0] >= 12 else loss  # step 12 on: diverged

    monkeypatch.setattr(lm, "next_token_loss", loss_turning_nan)
    if not every_step:
        monkeypatch.setattr(trainer_module.Trainer, "check_loss_every_step", False)
    run = tmp_path / "diverged"
    with pytest.raises(UserError, match=r"diverged at step 1[2-5].*last good checkpoint is .*step-10"):
        lm.train(tiny_lm_config, run, ["train.checkpoint_every=5", "train.keep_checkpoints=1", "train.log_every=7"])
    assert [folder.name for _, folder in RunFolder(run).checkpoints()] == ["step-10"]
    assert not (run / "final").exists() and not leftovers(run)
    model = mmgen.load(run)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


# ---------------------------------------------------------------------------- full disk
def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_previous_checkpoint_stays(tmp_path, tiny_lm_config,
                                                                                       monkeypatch):
    from mmgen.training import checkpoint

    save_tensors, calls = checkpoint.save_tensors, [0]

    def save_until_the_disk_fills(path, tensors):
        calls[0] += 1
        if calls[0] >= 3:  # the second checkpoint's optimizer state (each checkpoint: optimizer + RNG)
            raise OSError(errno.ENOSPC, "No space left on device")
        save_tensors(path, tensors)

    monkeypatch.setattr(checkpoint, "save_tensors", save_until_the_disk_fills)
    run = tmp_path / "full"
    with pytest.raises(UserError, match=r"could not write checkpoint step-10 .*No space left on device; .*step-5 is "
                                        r"still the latest"):
        lm.train(tiny_lm_config, run, ["train.checkpoint_every=5"])
    assert RunFolder(run).latest().name == "step-5" and not leftovers(run)
    monkeypatch.setattr(checkpoint, "save_tensors", save_tensors)
    lm.train(None, run, resume=True)
    assert (run / "final" / "model.safetensors").is_file()


def test_a_full_disk_while_writing_final_keeps_the_checkpoints(tmp_path, tiny_lm_config, monkeypatch):
    from mmgen import hub

    save_tensors = hub.save_tensors

    def full(path, tensors):
        if ".final.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        save_tensors(path, tensors)

    monkeypatch.setattr(hub, "save_tensors", full)
    run = tmp_path / "full-final"
    with pytest.raises(UserError, match=r"could not write .*final: No space left on device; --resume .* step-10"):
        lm.train(tiny_lm_config, run, ["train.checkpoint_every=10"])
    assert not (run / "final").exists() and not leftovers(run)


# ---------------------------------------------------------------------------- two runs in one folder
def test_a_second_run_in_a_locked_folder_is_refused_on_one_line(tmp_path, tiny_lm_config, capsys):
    run = tmp_path / "busy"
    with lock_held_elsewhere(run):
        assert cli.main(["train", "lm", "--config", str(tiny_lm_config), "--out", str(run)]) == 1
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "in use by another mmgen process" in error[0]
        assert list(run.iterdir()) == []  # nothing written by the refused run
        assert cli.main(["train", "lm", "--resume", str(run)]) == 1  # nor by a resume
    # the holder was killed without unlocking: the kernel dropped its lock, so the folder is usable again
    assert cli.main(["train", "lm", "--config", str(tiny_lm_config), "--out", str(run), "train.max_steps=2"]) == 0


def test_resume_while_the_run_is_still_training_is_refused(tmp_path, tiny_lm_config, capsys):
    run = tmp_path / "running"
    lm.train(tiny_lm_config, run, ["train.max_steps=10"])
    with lock_held_elsewhere(run):  # the first process, still training
        code = cli.main(["train", "lm", "--resume", str(run)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(error) == 1 and "in use by another mmgen process" in error[0]


def test_a_refused_config_leaves_no_empty_run_folder(tmp_path, tiny_lm_config, capsys):
    assert cli.main(["train", "lm", "--config", str(tiny_lm_config), "--out", str(tmp_path / "run"),
                     "data.path=/nowhere.txt"]) != 0
    assert not (tmp_path / "run").exists()


def test_a_killed_final_write_is_cleaned_up_on_resume(tmp_path, tiny_lm_config):
    run = tmp_path / "run"
    lm.train(tiny_lm_config, run, ["train.checkpoint_every=5"])
    (run / ".final.tmp-abc").mkdir()  # what a kill -9 during the write of final/ leaves
    (run / "checkpoints" / ".step-15.tmp").mkdir()
    old = run / ".final.old-xyz"  # a kill between the two renames that replace final/
    old.mkdir()
    (run / "final").rename(old / "final")
    assert not (run / "final").exists()
    RunFolder(run).clean()
    assert (run / "final" / "model.safetensors").is_file() and not leftovers(run)
