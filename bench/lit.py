"""Locked-image tuning (LiT) on a CLIP converted from open_clip: trainable fraction and training step time.

An open_clip model (random init: nothing is downloaded) is converted with mmgen.clip.open_clip_interop.from_open_clip,
then one contrastive training step (forward, backward, AdamW) is timed for each way of training it (the `towers:`
options of the CLIP recipes): every weight, the image tower locked (LiT), LiT with half the patches dropped (FLIP),
both towers locked but their last layer. Steps alternate between the variants, so load changes hit each alike.

    python bench/lit.py                                   # ViT-B-32, batch 16
    python bench/lit.py --model ViT-B-32 --batch-size 32 --repeats 3 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusion_fidelity import machine
from timing import interleaved_seconds

from mmgen.clip.objective import ContrastiveObjective
from mmgen.clip.open_clip_interop import from_open_clip
from mmgen.clip.towers import TowerTraining, apply_tower_training
from mmgen.io import atomic_write_text
from mmgen.training.optim import make_optimizer

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
VARIANTS = {
    "full": TowerTraining(),
    "lit": TowerTraining(lock_image=True),
    "lit+patch_dropout_0.5": TowerTraining(lock_image=True, patch_dropout=0.5),
    "both_locked_but_last_layer": TowerTraining(lock_image=True, image_unlocked_layers=1, lock_text=True,
                                                text_unlocked_layers=1),
}


def converted_clip(name: str):
    """A random-init open_clip `name`, converted to an mmgen CLIP."""
    import open_clip

    return from_open_clip(open_clip.create_model(name, pretrained=None))


def training_step(model, batch: dict):
    """One contrastive step of `model` (its optimizer made over what its tower options leave trainable)."""
    optimizer = make_optimizer(model, 1e-5, 0.1, (0.9, 0.98))
    objective = ContrastiveObjective("infonce")

    def step():
        loss, _ = objective(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = converted_clip(args.model)
    size, context = base.config.vision.image_size, base.config.text.context_length
    batch = {"images": torch.randn(args.batch_size, 3, size, size, device=device),
             "tokens": torch.randint(1, 49406, (args.batch_size, context), device=device)}
    batch["tokens"][:, -1] = 49407  # end of text
    steps, fractions = {}, {}
    for name, towers in VARIANTS.items():
        model = copy.deepcopy(base).to(device).train()
        apply_tower_training(model, towers)
        total = sum(p.numel() for p in model.parameters())
        fractions[name] = sum(p.numel() for p in model.parameters() if p.requires_grad) / total
        steps[name] = training_step(model, batch)
    seconds = interleaved_seconds(steps, args.repeats, 1, device)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "device": args.device, "model": args.model,
        "parameters": sum(p.numel() for p in base.parameters()), "batch_size": args.batch_size,
        "command": " ".join(sys.argv),
        "variants": {name: {"trainable_fraction": fractions[name],
                            "step_seconds": statistics.median(seconds[name])} for name in VARIANTS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="an open_clip model name (random init)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "lit.json")
    args = parser.parse_args()
    if args.batch_size < 2 or args.repeats < 1:
        parser.error("--batch-size must be >= 2 and --repeats >= 1")
    results = run(args)
    full = results["variants"]["full"]["step_seconds"]
    print(f"{args.model}, {results['parameters'] / 1e6:.1f}M parameters, batch {args.batch_size}, {args.device}")
    print(f"{'variant':<30}{'trainable':>11}{'step (s)':>10}{'vs full':>9}")
    for name, row in results["variants"].items():
        print(f"{name:<30}{row['trainable_fraction']:>10.1%}{row['step_seconds']:>10.3f}"
              f"{full / row['step_seconds']:>8.2f}x")
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
