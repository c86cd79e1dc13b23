"""Tiny random models for the fine-tuning tests, each with inputs and a forward that returns one tensor."""

from dataclasses import dataclass
from typing import Callable

import torch

from mmgen.diffusion import UNet, UNetConfig
from mmgen.text import GPT, GPTConfig
from tests.clip.helpers import make_clip, random_tokens
from tests.diffusion.helpers import TINY_UNET, tiny_text2img


@dataclass
class Case:
    """A model factory, a batch for it, and `run(model, batch) -> tensor`."""

    build: Callable[[], torch.nn.Module]
    batch: Callable[[], tuple]
    run: Callable


def tiny_gpt(seed: int = 0, **changes) -> GPT:
    options = dict(vocab_size=61, context_length=16, num_layers=2, num_heads=4, dim=64)
    options.update(changes)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**options))
    with torch.no_grad():  # move norms and biases off their init
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(UNetConfig(**TINY_UNET))
    with torch.no_grad():  # zero-initialised output layers would hide every other layer
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.2)
    return model.eval()


def _noisy_images(channels: int = 3, size: int = 8) -> tuple:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, channels, size, size, generator=generator), torch.tensor([3, 70])


def _clip_batch() -> tuple:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=generator), random_tokens(2, 16, generator)


def _text2img_batch() -> tuple:
    x, t = _noisy_images()
    return x, t, random_tokens(2, 16, torch.Generator().manual_seed(2))


def _clip_run(model, batch):
    output = model(*batch)
    return torch.cat([output.image_features, output.text_features], dim=-1)


CASES = {
    "gpt": Case(tiny_gpt, lambda: (torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1)),),
                lambda model, batch: model(*batch)),
    "clip": Case(make_clip, _clip_batch, _clip_run),
    "unet": Case(tiny_unet, _noisy_images, lambda model, batch: model(*batch)),
    "text2img": Case(tiny_text2img, _text2img_batch, lambda model, batch: model(*batch)),
}


def train_steps(model, case: Case, steps: int = 3, lr: float = 0.05) -> None:
    """A few Adam steps on the trainable parameters, pushing the output towards a fixed random target."""
    batch = case.batch()
    with torch.no_grad():
        target = torch.randn_like(case.run(model, batch), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = (case.run(model, batch) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def output(model, case: Case) -> torch.Tensor:
    return case.run(model, case.batch())


def write_yaml(path, data: dict):
    """Write `data` as YAML to `path` and return the path."""
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


FAST_TRAIN = {"batch_size": 4, "max_steps": 4, "lr": 1e-2, "warmup_steps": 0, "eval_every": 2, "eval_batches": 1,
              "log_every": 2, "checkpoint_every": 2, "weight_decay": 0.0, "tensorboard": False, "progress": False}
