"""Run by test_loss.py under torch.distributed.run: each process scores its shard of one fixed batch.

`losses_and_gradients(rank, world_size)` is also called by the test itself with world size 1.
"""

import os
import sys

import torch
from torch import distributed as dist
from torch.nn import functional as F

from mmgen.clip import ClipLoss, SigLipLoss

BATCH, INPUT_DIM, EMBED_DIM = 8, 6, 5


def losses_and_gradients(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Loss and gradients (shared projections, logit scale and bias, local features) of each loss on this shard."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, INPUT_DIM, generator=generator)
    texts = torch.randn(BATCH, INPUT_DIM, generator=generator)
    image_projection = torch.randn(INPUT_DIM, EMBED_DIM, generator=generator)
    text_projection = torch.randn(INPUT_DIM, EMBED_DIM, generator=generator)
    local = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    results = {}
    for name, loss_fn, bias in (("clip", ClipLoss(), None), ("siglip", SigLipLoss(), -2.0)):
        parameters = {
            "image_projection": image_projection.clone().requires_grad_(),
            "text_projection": text_projection.clone().requires_grad_(),
            "log_scale": torch.tensor(2.3, requires_grad=True),
        }
        if bias is not None:
            parameters["logit_bias"] = torch.tensor(bias, requires_grad=True)
        image_features = F.normalize(images[local] @ parameters["image_projection"], dim=-1)
        text_features = F.normalize(texts[local] @ parameters["text_projection"], dim=-1)
        image_features.retain_grad()
        text_features.retain_grad()
        loss = loss_fn(image_features, text_features, parameters["log_scale"].exp(), parameters.get("logit_bias"))
        loss.backward()
        results[f"{name}.loss"] = loss.detach()
        results[f"{name}.image_features"] = image_features.grad
        results[f"{name}.text_features"] = text_features.grad
        results.update({f"{name}.{key}": parameter.grad for key, parameter in parameters.items()})
    return {key: value.contiguous() for key, value in results.items()}


if __name__ == "__main__":
    from safetensors.torch import save_file

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    save_file(losses_and_gradients(rank, dist.get_world_size()), f"{sys.argv[1]}/rank{rank}.safetensors")
    dist.barrier()  # both ranks' results written
    # leave without tearing gloo down: its teardown sometimes aborts under load ("terminate called without an
    # active exception", SIGABRT, seen in CI) after the results are already on disk
    os._exit(0)
