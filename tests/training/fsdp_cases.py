"""Tiny GPT / CLIP / UNet training runs on random data, shared by the FSDP tests and their torchrun worker
(tests/training/fsdp_worker.py): the same run on one process (global batch 4) or two (2 each)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmgen.training import TrainConfig, Trainer
from mmgen.training.fsdp import FSDPConfig

CASES = ("gpt", "clip", "unet")
STEPS = 4  # checkpoints at step 2; final/ after step 4
GLOBAL_BATCH = 4


def _gpt():
    from mmgen.text import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=13, context_length=8, num_layers=2, num_heads=2, dim=16))
    data = [torch.randint(0, 13, (9,), generator=torch.Generator().manual_seed(i)) for i in range(32)]

    def loss_fn(model, batch):
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    return model, loss_fn, data


def _clip():
    from mmgen.clip.model import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig
    from mmgen.clip.objective import ContrastiveObjective

    model = CLIP(CLIPConfig(embed_dim=16, vision=CLIPVisionConfig(image_size=8, patch_size=4, width=16, layers=2,
                                                                     heads=2),
                            text=CLIPTextConfig(context_length=6, vocab_size=20, width=16, layers=2, heads=2)))
    data = [{"images": torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)),
             "tokens": torch.randint(1, 20, (6,), generator=torch.Generator().manual_seed(100 + i))}
            for i in range(32)]
    objective = ContrastiveObjective("infonce")
    return model, lambda model, batch: objective(model, batch)[0], data


def _unet():
    from mmgen.diffusion.unet import UNet, UNetConfig

    model = UNet(UNetConfig(in_channels=2, out_channels=2, base_channels=8, channel_multipliers=(1, 2),
                            blocks_per_level=1, attention_levels=(False, True), num_heads=2, groups=4))
    torch.nn.init.normal_(model.conv_out.weight, std=0.02)  # not zero: every layer gets a gradient at step 1
    data = [{"x": torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(i)),
             "noise": torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(500 + i)),
             "t": torch.tensor(float(i % 7))} for i in range(32)]

    def loss_fn(model, batch):
        return F.mse_loss(model(batch["x"], batch["t"]), batch["noise"])

    return model, loss_fn, data


BUILDERS = {"gpt": _gpt, "clip": _clip, "unet": _unet}


def without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The attention key bias has an exactly zero gradient (softmax ignores a shift shared by all keys), so AdamW
    turns its rounding noise (~1e-10, different in every summation order) into steps of order lr: left out."""
    if name.endswith("qkv_proj.bias"):
        query, _, value = tensor.chunk(3)
        return torch.cat([query, value])
    return tensor


def max_difference(a: dict, b: dict) -> float:
    """The largest difference between two state dicts with the same names (the attention key bias left out)."""
    assert sorted(a) == sorted(b)
    return max((without_key_bias(name, a[name]).float() - without_key_bias(name, b[name]).float()).abs().max().item()
               for name in a if a[name].numel())


def train(case: str, run_dir: Path, processes: int = 1, fsdp: dict | None = None, resume: bool = False,
          ema_decay: float = 0.0, seed: int = 3, compile: bool = False) -> Trainer:
    """Train `case` to STEPS steps with the global batch split over `processes`; fsdp: train.fsdp's keys."""
    torch.manual_seed(seed)
    model, loss_fn, data = BUILDERS[case]()
    config = TrainConfig(batch_size=GLOBAL_BATCH // processes, max_steps=STEPS, lr=1e-3, min_lr=1e-4,
                         warmup_steps=1, eval_every=0, log_every=1, checkpoint_every=2, keep_checkpoints=2,
                         ema_decay=ema_decay, seed=seed, tensorboard=False, progress=False, compile=compile,
                         fsdp=FSDPConfig(**(fsdp or {})))
    trainer = Trainer(model, config, run_dir, loss_fn=loss_fn, train_dataset=data)
    trainer.fit(resume=resume)
    return trainer


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file of a run folder."""
    return load_file(str(folder / name))


def train_losses(run: Path) -> list[float]:
    """train/loss of every logged step of a run, in order."""
    return [r["train/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r]
