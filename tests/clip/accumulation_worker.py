"""Run by test_cached_accumulation.py under torch.distributed.run: 2 processes x 2 micro-batches of 3, through
Accelerate's DDP and the Trainer's GradientPasses, against one process on the whole batch of 12."""

import os
import sys

import torch

from mmgen.clip.objective import ContrastiveObjective
from tests.clip.helpers import make_clip, random_tokens

PROCESSES, MICRO_BATCHES, SIZE = 2, 2, 3


def all_micro_batches() -> list[dict]:
    """Every process's micro-batches, process-major: rank r owns [r * MICRO_BATCHES, (r + 1) * MICRO_BATCHES)."""
    generator = torch.Generator().manual_seed(0)
    return [{"images": torch.randn(SIZE, 3, 32, 32, generator=generator),
             "tokens": random_tokens(SIZE, 16, generator)} for _ in range(PROCESSES * MICRO_BATCHES)]


def model_for(loss: str):
    return make_clip(seed=3, init_logit_bias=-5.0 if loss == "siglip" else None).train()


def big_batch_gradients(loss: str) -> dict[str, torch.Tensor]:
    """Loss and gradients of one process on all 12 pairs."""
    model = model_for(loss)
    batches = all_micro_batches()
    value, _ = ContrastiveObjective(loss)(model, {key: torch.cat([b[key] for b in batches])
                                                  for key in ("images", "tokens")})
    value.backward()
    return {"loss": value.detach(), **{n: p.grad for n, p in model.named_parameters()}}


if __name__ == "__main__":
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from mmgen.training.accumulation import GradientPasses

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    for loss in ("infonce", "siglip"):
        model = accelerator.prepare(model_for(loss))
        mine = all_micro_batches()[rank * MICRO_BATCHES:(rank + 1) * MICRO_BATCHES]
        value, _ = ContrastiveObjective(loss).step(model, mine, GradientPasses(accelerator, model))
        results = {"loss": value, **{n: p.grad for n, p in accelerator.unwrap_model(model).named_parameters()}}
        save_file({k: v.contiguous() for k, v in results.items()}, f"{sys.argv[1]}/{loss}-rank{rank}.safetensors")
    accelerator.wait_for_everyone()  # both ranks' results written
    # leave without tearing gloo down: its teardown sometimes aborts under load ("terminate called without an
    # active exception", SIGABRT, seen in CI) after the results are already on disk
    os._exit(0)
