"""Fine-tune a trained model: `accelerate launch train/finetune.py lm --base runs/shakespeare-char --config
configs/finetune-lm-shakespeare-lora.yaml --out RUN_DIR` (lm, clip, diffusion or clip-classifier)."""

import sys

from mmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
