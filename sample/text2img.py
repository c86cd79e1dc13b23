"""Sample images from a text-to-image run: `python sample/text2img.py --checkpoint RUN_DIR --prompt "a red circle" --out OUT_DIR`."""

import sys

from mmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", "text2img", *sys.argv[1:]]))
