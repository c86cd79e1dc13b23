"""CLIP on shapes: held-out zero-shot accuracy and retrieval within a time budget, and training-step speed
against open_clip on the same architecture, same batch, same run.

    python bench/clip_shapes.py                  # train configs/clip-shapes.yaml, evaluate, compare speed
    python bench/clip_shapes.py --speed-only     # only the open_clip comparison
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIG = REPOSITORY / "configs" / "clip-shapes.yaml"


def train_and_evaluate(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mmgen.cli", "train", "clip", "--config", str(CONFIG), "--out", str(run),
                        "train.progress=false", *overrides], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        evaluation = subprocess.run([sys.executable, "-m", "mmgen.cli", "eval", "clip", "--checkpoint", str(run),
                                     "--zeroshot-dir", "shapes", "--retrieval", "shapes:val", "--max-samples", "1000",
                                     "--json"], check=True, capture_output=True, text=True)
        return {"train_wall_s": wall, **json.loads(evaluation.stdout.strip().splitlines()[-1])}


def step_time(step, repeats: int = 10) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def compare_with_open_clip(batch_size: int) -> dict:
    """Seconds per training step (forward, InfoNCE, backward, AdamW) of mmgen's CLIP and open_clip's, same shapes."""
    from open_clip.loss import ClipLoss as OpenClipLoss

    from mmgen.clip import CLIP, ClipLoss
    from mmgen.clip.open_clip_interop import to_open_clip
    from mmgen.config import from_dict
    from mmgen.recipes.clip import CLIPRecipe

    recipe = from_dict(CLIPRecipe, yaml.safe_load(CONFIG.read_text()))
    torch.manual_seed(0)
    ours = CLIP(recipe.model).train()
    theirs = to_open_clip(ours).train()
    size, context = recipe.model.vision.image_size, recipe.model.text.context_length
    images = torch.randn(batch_size, 3, size, size)
    tokens = torch.randint(1, 49406, (batch_size, context))
    tokens[:, 0], tokens[:, -1] = 49406, 49407

    def stepper(model, forward, loss):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss(*forward()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    mmgen_loss, open_clip_loss = ClipLoss(), OpenClipLoss()
    ours_step = stepper(ours, lambda: ours(images, tokens)[:3], mmgen_loss)

    theirs_step = stepper(theirs, lambda: theirs(images, tokens)[:3], open_clip_loss)
    mmgen_s, open_clip_s = step_time(ours_step), step_time(theirs_step)
    return {"batch_size": batch_size, "mmgen_step_s": mmgen_s, "open_clip_step_s": open_clip_s,
            "speedup_vs_open_clip": open_clip_s / mmgen_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="mmgen config overrides for the training run")
    args = parser.parse_args()
    results = {"date": time.strftime("%Y-%m-%d"), "cpu_threads": torch.get_num_threads(), "overrides": args.overrides}
    batch_size = yaml.safe_load(CONFIG.read_text())["train"]["batch_size"]
    results["speed"] = compare_with_open_clip(batch_size)
    if not args.speed_only:
        results["shapes"] = train_and_evaluate(args.overrides)
    print(json.dumps(results, indent=2))
    target = REPOSITORY / "bench" / "results"
    target.mkdir(exist_ok=True)
    (target / "clip_shapes.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
