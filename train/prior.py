"""Train an unCLIP prior: `accelerate launch train/prior.py --config configs/prior-shapes.yaml --out RUN_DIR`."""

import sys

from mmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "prior", *sys.argv[1:]]))
