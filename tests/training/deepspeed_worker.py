"""Run by tests/training/test_deepspeed.py under `accelerate launch --config_file configs/accelerate/deepspeed-*.yaml`
(2 processes, DeepSpeed on its CPU accelerator over gloo). argv: OUT folder, SINGLE (the one-process GPT run). Writes
OUT/gpt (trained), OUT/gpt-resumed (killed after step-2's checkpoint, then --resume), OUT/gpt-from-single (SINGLE's
step-2 checkpoint resumed under DeepSpeed), the first two in bf16 (OUT/gpt-bf16, OUT/gpt-bf16-resumed), a CLIP
(0-dim logit_scale) trained and resumed (OUT/clip, OUT/clip-resumed), a SigLIP CLIP (0-dim logit_scale and
logit_bias: OUT/siglip) and OUT/refused.json (the one-line errors of what DeepSpeed cannot run)."""

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.training.fsdp_cases import BUILDERS, GLOBAL_BATCH, STEPS, train  # noqa: E402


def train_bf16(run_dir: Path, resume: bool = False) -> None:
    """`train("gpt", ...)` with train.mixed_precision=bf16: DeepSpeed keeps bf16 parameters and fp32 master weights."""
    import torch

    from mmgen.training import TrainConfig, Trainer

    torch.manual_seed(3)
    model, loss_fn, data = BUILDERS["gpt"]()
    config = TrainConfig(batch_size=GLOBAL_BATCH // 2, max_steps=STEPS, lr=1e-3, min_lr=1e-4, warmup_steps=1,
                         eval_every=0, log_every=1, checkpoint_every=2, seed=3, tensorboard=False, progress=False,
                         mixed_precision="bf16")
    Trainer(model, config, run_dir, loss_fn=loss_fn, train_dataset=data).fit(resume=resume)


def train_siglip(run_dir: Path, processes: int = 1) -> None:
    """`train("clip", ...)` with a SigLIP CLIP: a learned logit_bias next to logit_scale, both 0-dim."""
    import torch

    from mmgen.clip.model import CLIP
    from mmgen.clip.objective import ContrastiveObjective
    from mmgen.training import TrainConfig, Trainer

    torch.manual_seed(3)
    model, _, data = BUILDERS["clip"]()
    model = CLIP(dataclasses.replace(model.config, init_logit_scale=math.log(10.0), init_logit_bias=-10.0))
    objective = ContrastiveObjective("siglip")
    config = TrainConfig(batch_size=GLOBAL_BATCH // processes, max_steps=STEPS, lr=1e-3, min_lr=1e-4, warmup_steps=1,
                         eval_every=0, log_every=1, checkpoint_every=2, seed=3, tensorboard=False, progress=False)
    Trainer(model, config, run_dir, loss_fn=lambda model, batch: objective(model, batch)[0],
            train_dataset=data).fit()


def refusals(out: Path) -> dict[str, str]:
    """The ConfigError of each launch mmgen refuses under DeepSpeed."""
    from mmgen.errors import ConfigError
    from mmgen.training import TrainConfig, Trainer

    model, loss_fn, data = BUILDERS["gpt"]()
    errors = {}
    try:
        Trainer(model, TrainConfig(batch_size=1, grad_accum_steps=2, tensorboard=False, progress=False),
                out / "accumulating", loss_fn=loss_fn, train_dataset=data)
    except ConfigError as error:
        errors["grad_accum_steps"] = str(error)
    return errors


def kill_after_step_2(run: Path, copy: Path) -> None:
    """`copy`: the run as a kill after step-2's checkpoint leaves it (final/ gone)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("final"))
    dist.barrier()


def main(out: Path, single: Path) -> None:
    import torch.distributed as dist

    train("gpt", out / "gpt", processes=2)
    kill_after_step_2(out / "gpt", out / "gpt-resumed")
    train("gpt", out / "gpt-resumed", processes=2, resume=True)
    kill_after_step_2(single, out / "gpt-from-single")
    train("gpt", out / "gpt-from-single", processes=2, resume=True)
    train_bf16(out / "gpt-bf16")
    kill_after_step_2(out / "gpt-bf16", out / "gpt-bf16-resumed")
    train_bf16(out / "gpt-bf16-resumed", resume=True)
    train("clip", out / "clip", processes=2)
    kill_after_step_2(out / "clip", out / "clip-resumed")
    train("clip", out / "clip-resumed", processes=2, resume=True)
    train_siglip(out / "siglip", processes=2)
    errors = refusals(out)
    if dist.get_rank() == 0:
        (out / "refused.json").write_text(json.dumps(errors))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
