"""train.fsdp's config and the single-process pieces of mmgen.training.fsdp (the sharded runs: test_fsdp.py)."""

import pytest
import torch

from mmgen.config import from_dict
from mmgen.errors import ConfigError
from mmgen.training import TrainConfig
from mmgen.training.fsdp import FSDPConfig, materialize, meta_skeleton, shard_model


def test_train_fsdp_is_off_by_default_and_read_from_the_config():
    assert TrainConfig().fsdp == FSDPConfig(enabled=False)
    config = from_dict(TrainConfig, {"fsdp": {"enabled": True, "reshard_after_forward": False}}, "train.")
    assert config.fsdp.enabled and not config.fsdp.reshard_after_forward


def test_a_bad_fsdp_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.fsdp\.reshard"):
        from_dict(TrainConfig, {"fsdp": {"reshard": True}}, "train.")
    with pytest.raises(ConfigError, match=r"train\.fsdp\.enabled"):
        from_dict(TrainConfig, {"fsdp": {"enabled": "sometimes"}}, "train.")


def test_cpu_offload_without_gpus_is_one_clear_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="train.fsdp.cpu_offload=true needs GPUs"):
        shard_model(model, FSDPConfig(enabled=True, cpu_offload=True), torch.device("cpu"))


def test_the_skeleton_costs_no_memory_and_keeps_tied_weights_tied():
    from mmgen.text import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=13, context_length=8, num_layers=1, num_heads=2, dim=16))
    skeleton = meta_skeleton(model)
    assert all(parameter.is_meta for parameter in skeleton.parameters())
    assert not any(parameter.is_meta for parameter in model.parameters())  # the model itself is untouched
    copy = materialize(skeleton)
    assert copy.lm_head.weight is copy.token_embedding.weight
    copy.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 13, (2, 8))
    torch.testing.assert_close(copy(tokens), model(tokens), rtol=0, atol=0)


def test_the_cli_trains_with_train_fsdp_and_names_a_bad_key(tmp_path, tiny_lm_config, capsys):
    """`mmgen train lm ... train.fsdp.enabled=true` on one process (a 1-process group, in a subprocess): the recipe's
    own save_fn writes final/ from the gathered model; a bad train.fsdp key is one line, exit 2."""
    import subprocess
    import sys

    import mmgen
    from mmgen import cli
    from tests.test_cli import one_line_error

    run = tmp_path / "run"
    command = [sys.executable, "-m", "mmgen.cli", "train", "lm", "--config", str(tiny_lm_config), "--out", str(run),
               "train.fsdp.enabled=true", "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "final" / "tokenizer.json").exists()  # written by the lm recipe's save_fn
    assert type(mmgen.load(run)).__name__ == "GPT"
    assert (run / "checkpoints" / "step-2" / "optimizer.safetensors").exists()

    code = cli.main(["train", "lm", "--config", str(tiny_lm_config), "--out", str(tmp_path / "bad"),
                     "train.fsdp.reshard=false"])
    one_line_error(code, capsys.readouterr().err, 2, "train.fsdp.reshard")
