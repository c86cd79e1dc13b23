"""Train a GPT language model: `accelerate launch train/lm.py --config configs/lm-shakespeare-char.yaml --out RUN_DIR`."""

import sys

from mmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "lm", *sys.argv[1:]]))
