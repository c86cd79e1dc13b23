"""CLIP on shapes: train configs/clip-shapes.yaml (timed), then held-out zero-shot accuracy on 4000 images of the
held-out shape x colour pairs and image<->text recall on their captions, as `mmgen eval clip` computes them.
Speed against open_clip is bench/clip.py.

    python bench/clip_shapes.py [OVERRIDES...]
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
                                     "--zeroshot-dir", "shapes:val:4000", "--retrieval", "shapes:val", "--max-samples", "4000",
                                     "--json"], check=True, capture_output=True, text=True)
        return {"train_wall_s": wall, **json.loads(evaluation.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="mmgen config overrides for the training run")
    args = parser.parse_args()
    results = {"date": time.strftime("%Y-%m-%d"), "cpu_threads": torch.get_num_threads(), "overrides": args.overrides}
    results["shapes"] = train_and_evaluate(args.overrides)
    print(json.dumps(results, indent=2))
    target = REPOSITORY / "bench" / "results"
    target.mkdir(exist_ok=True)
    (target / "clip_shapes.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
