"""Train CLIP: `accelerate launch train/clip.py --config configs/clip-shapes.yaml --out RUN_DIR`."""

import sys

from mmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "clip", *sys.argv[1:]]))
