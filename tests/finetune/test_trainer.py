"""The one Trainer on an adapted model: it optimises only the LoRA matrices; final/ can hold just the adapter."""

import copy

import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from mmgen.finetune import LoRAConfig, add_lora, load_adapter, lora_state, write_adapter
from mmgen.training import TrainConfig, Trainer
from tests.finetune.helpers import CASES, output, tiny_gpt


def next_token_loss(model, batch):
    (tokens,) = batch
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def test_trainer_optimises_only_the_adapter_and_saves_it(tmp_path):
    base = tiny_gpt()
    model = add_lora(copy.deepcopy(base), LoRAConfig(rank=4, targets=["attn", "mlp"]))
    config = TrainConfig(batch_size=4, max_steps=3, lr=1e-2, warmup_steps=0, eval_every=0, checkpoint_every=0,
                         tensorboard=False, progress=False)
    data = TensorDataset(torch.randint(0, 61, (32, 17), generator=torch.Generator().manual_seed(0)))
    trainer = Trainer(model, config, tmp_path / "run", loss_fn=next_token_loss, train_dataset=data,
                      save_fn=lambda model, folder: write_adapter(model, folder, base="base"))
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for name, p in model.named_parameters() if ".lora_" in name}
    trained = trainer.fit()
    trained_state = trained.state_dict()
    for name, parameter in base.state_dict().items():  # the frozen base did not move
        layer, _, leaf = name.rpartition(".")
        key = f"{layer}.base_layer.{leaf}" if layer in lora_state(trained).layers else name
        torch.testing.assert_close(trained_state[key], parameter, atol=0, rtol=0)
    final = tmp_path / "run" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    restored = load_adapter(copy.deepcopy(base), final)
    torch.testing.assert_close(output(restored, CASES["gpt"]), output(trained, CASES["gpt"]), atol=0, rtol=0)
    assert not torch.equal(output(restored, CASES["gpt"]), output(base, CASES["gpt"]))
