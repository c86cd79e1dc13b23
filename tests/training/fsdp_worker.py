"""Run under `torchrun --nproc_per_node 2` by tests/training/test_fsdp.py: the sharded runs it compares with one
process. argv: OUT folder (each run writes OUT/<name>/, a run folder); `OUT --one`, as a plain process afterwards,
resumes the 2-process sharded checkpoint on one process."""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.training.fsdp_cases import train  # noqa: E402


def check_other_methods(out: Path) -> None:
    """encode_image / encode_text of a sharded CLIP and generate() with a sharded GPT against unsharded copies:
    rank 0 writes the largest differences to OUT/methods.json."""
    import copy
    import json

    import torch
    import torch.distributed as dist

    from mmgen.text.generate import generate
    from mmgen.training.fsdp import FSDPConfig, shard_model
    from tests.training.fsdp_cases import BUILDERS

    torch.manual_seed(0)
    clip, gpt = BUILDERS["clip"]()[0], BUILDERS["gpt"]()[0]
    plain_clip, plain_gpt = copy.deepcopy(clip), copy.deepcopy(gpt)
    for model in (clip, gpt):
        shard_model(model, FSDPConfig(enabled=True), torch.device("cpu"))
    images, tokens = torch.randn(2, 3, 8, 8), torch.randint(1, 20, (2, 6))
    prompt = torch.randint(0, 13, (2, 3))
    with torch.no_grad():
        differences = {
            "encode_image": (clip.encode_image(images) - plain_clip.encode_image(images)).abs().max().item(),
            "encode_text": (clip.encode_text(tokens) - plain_clip.encode_text(tokens)).abs().max().item(),
            "generate": int((generate(gpt, prompt, 4, top_k=1) != generate(plain_gpt, prompt, 4, top_k=1)).sum()),
        }
    if dist.get_rank() == 0:
        (out / "methods.json").write_text(json.dumps(differences))


def main(out: Path) -> None:
    import torch.distributed as dist

    check_other_methods(out)
    train("gpt", out / "gpt", processes=2, fsdp={"enabled": True, "sharded_checkpoints": True})  # tied weights
    train("clip", out / "clip", processes=2, ema_decay=0.9, fsdp={"enabled": True, "reshard_after_forward": False})
    train("unet", out / "unet", processes=2, fsdp={"enabled": True})
    # a kill after step-2's checkpoint: everything after it gone, then --resume, for both checkpoint layouts
    for name in ("gpt", "unet"):
        if dist.get_rank() == 0:
            shutil.copytree(out / name, out / f"{name}-resumed", ignore=shutil.ignore_patterns("final"))
        dist.barrier()
        fsdp = {"enabled": True, "sharded_checkpoints": name == "gpt"}
        train(name, out / f"{name}-resumed", processes=2, fsdp=fsdp, resume=True)


def resume_on_one_process(out: Path) -> None:
    """The 2-process sharded checkpoint of "gpt" resumed by one process (itself sharded, a 1-process group)."""
    shutil.copytree(out / "gpt", out / "gpt-one", ignore=shutil.ignore_patterns("final"))
    train("gpt", out / "gpt-one", processes=1, fsdp={"enabled": True, "sharded_checkpoints": True}, resume=True)


if __name__ == "__main__":
    (resume_on_one_process if sys.argv[2:] == ["--one"] else main)(Path(sys.argv[1]))
