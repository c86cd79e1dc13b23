"""unCLIP image variations: `python sample/variations.py --checkpoint DECODER_RUN IMAGE... --out OUT_DIR`."""

import sys

from mmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", "variations", *sys.argv[1:]]))
