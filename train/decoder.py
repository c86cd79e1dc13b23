"""Train an unCLIP decoder: `accelerate launch train/decoder.py --config configs/decoder-shapes.yaml --out RUN_DIR`."""

import sys

from mmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "decoder", *sys.argv[1:]]))
