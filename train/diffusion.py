"""Train a text-to-image diffusion model: `accelerate launch train/diffusion.py --config configs/diffusion-shapes.yaml --out RUN_DIR`."""

import sys

from mmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "diffusion", *sys.argv[1:]]))
