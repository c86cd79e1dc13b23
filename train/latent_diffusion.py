"""Train latent text-to-image diffusion: `accelerate launch train/latent_diffusion.py --config configs/ldm-shapes.yaml --out RUN_DIR`."""

import sys

from mmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "latent-diffusion", *sys.argv[1:]]))
