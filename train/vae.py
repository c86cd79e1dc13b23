"""Train a KL autoencoder for latent diffusion: `accelerate launch train/vae.py --config configs/vae-shapes.yaml --out RUN_DIR`."""

import sys

from mmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "vae", *sys.argv[1:]]))
