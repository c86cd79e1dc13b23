"""EMA of the weights: the update rule, what the Trainer evaluates and saves with it, and exact resume."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from mmgen.data.text import TokenWindows, stack_windows
from mmgen.recipes import lm
from mmgen.recipes.lm import next_token_loss
from mmgen.text import GPT, GPTConfig
from mmgen.training import TrainConfig, Trainer
from mmgen.training.ema import ExponentialMovingAverage
from tests.training.test_trainer import assert_same_weights, weights

EMA = ["train.ema_decay=0.9", "model.dropout=0.2"]  # dropout: the RNG state must resume too


def test_update_rule_warmup_buffers_and_shared_frozen_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model[2].requires_grad_(False)
    ema = ExponentialMovingAverage(model, decay=0.99)
    assert ema.model[2].weight is model[2].weight  # frozen: shared, not copied
    assert ema.model[0].weight is not model[0].weight
    assert [name for name, _ in ema.averaged] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.99
    before = ema.model[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(5.0)
    ema.update(model, updates_before=2)
    decay = 3 / 12
    torch.testing.assert_close(ema.model[0].weight, decay * before + (1 - decay) * model[0].weight)
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)
    assert not any(p.requires_grad for p in ema.model.parameters())
    assert ExponentialMovingAverage(model, 0.5, warmup=False).decay_at(0) == 0.5


def test_the_average_shares_the_config_so_stored_sampling_defaults_reach_checkpoints():
    model = GPT(GPTConfig(vocab_size=11, context_length=8, num_layers=1, num_heads=2, dim=8))
    ema = ExponentialMovingAverage(model, decay=0.9)
    assert ema.model.config is model.config
    assert ema.model.lm_head.weight is not model.lm_head.weight  # the weights are still copies


def test_trainer_evaluates_and_saves_the_ema_model(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, context_length=8, num_layers=1, num_heads=2, dim=16))
    tokens = torch.randint(0, 11, (400,))
    config = TrainConfig(batch_size=4, max_steps=6, warmup_steps=1, eval_every=3, eval_batches=1, log_every=3,
                         checkpoint_every=0, ema_decay=0.9, tensorboard=False, progress=False)
    evaluated = []
    trainer = Trainer(model, config, tmp_path / "run", loss_fn=next_token_loss, train_dataset=TokenWindows(tokens, 8),
                      collate_fn=stack_windows, evaluate_fn=lambda m, step: evaluated.append(m) or {})
    returned = trainer.fit()
    assert len(evaluated) == 2 and all(m is trainer.ema.model for m in evaluated) and returned is trainer.ema.model
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    trained = trainer.model.state_dict()
    assert_same_weights(final, {name: t for name, t in trainer.ema.model.state_dict().items() if name in final})
    assert not torch.equal(final["transformer.blocks.0.attn.qkv_proj.weight"], trained["transformer.blocks.0.attn.qkv_proj.weight"])


def test_resume_with_ema_gives_the_same_ema_weights(tmp_path, tiny_lm_config):
    lm.train(tiny_lm_config, tmp_path / "whole", EMA)
    interrupted = tmp_path / "interrupted"
    lm.train(tiny_lm_config, interrupted, EMA)
    checkpoint = interrupted / "checkpoints" / "step-10"
    assert (checkpoint / "ema.safetensors").is_file()
    shutil.rmtree(interrupted / "final")
    lm.train(None, interrupted, resume=True)
    assert_same_weights(weights(tmp_path / "whole"), weights(interrupted))
    # the EMA lags the trained weights: the checkpoint's EMA is not its model
    ema, trained = load_file(str(checkpoint / "ema.safetensors")), load_file(str(checkpoint / "model.safetensors"))
    assert not torch.equal(ema["norm.weight"], trained["norm.weight"])


def test_resume_without_the_ema_file_is_one_clear_error(tmp_path, tiny_lm_config):
    from mmgen.errors import CheckpointError

    run = tmp_path / "run"
    lm.train(tiny_lm_config, run, EMA + ["train.max_steps=10", "train.checkpoint_every=5"])
    (run / "checkpoints" / "step-5" / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing file: .*ema.safetensors"):
        lm.train(None, run, ["train.max_steps=12"], resume=True)


def test_loading_an_unfinished_run_gives_its_ema_weights(tmp_path, tiny_lm_config):
    import mmgen

    run = tmp_path / "run"
    lm.train(tiny_lm_config, run, EMA)
    shutil.rmtree(run / "final")  # as if the run had stopped after its step-10 checkpoint
    loaded = mmgen.load(run).state_dict()
    checkpoint = run / "checkpoints" / "step-10"
    ema, trained = load_file(str(checkpoint / "ema.safetensors")), load_file(str(checkpoint / "model.safetensors"))
    assert not torch.equal(loaded["norm.weight"], trained["norm.weight"])
    assert_same_weights({name: loaded[name] for name in ema}, ema)
    assert torch.equal(loaded["lm_head.weight"], ema["token_embedding.weight"])  # tied weights follow
