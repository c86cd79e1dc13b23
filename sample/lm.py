"""Sample text from a GPT run: `python sample/lm.py --checkpoint RUN_DIR --prompt "ROMEO:"`."""

import sys

from mmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", "lm", *sys.argv[1:]]))
