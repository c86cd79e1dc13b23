"""Write a real, public, labelled image set that works offline as captioned data mmgen reads.

`digits`: scikit-learn's handwritten digits (1,797 8x8 grey scans of 43 writers, ten classes; from the UCI
"Optical Recognition of Handwritten Digits" set, CC BY 4.0), shipped inside the scikit-learn package, so no download.
Install it with `pip install -e ".[bench]"` (or `pip install scikit-learn`). The 8x8 scans are upscaled (bicubic) to
--size pixels, white ink on black, and split 80/20 per class with a fixed seed:

    OUT/train/<class>/<index>.png, OUT/val/<class>/<index>.png   labelled image folders (data.zeroshot=OUT/val)
    OUT/train.csv, OUT/val.csv        image,caption,label,class (data.train=OUT/train.csv data.val=OUT/val.csv)
    OUT/classes.txt                   the class names in label order ("zero" ... "nine")
    OUT/zeroshot_templates.txt        prompt templates for zero-shot ("a handwritten digit {}", ...)
    OUT/info.json                     source, licence, split seed, counts

Each image gets one caption naming its class in one of a few phrasings ("a handwritten digit seven", "the number 7",
...), drawn per image from the split seed. The class folders are named by the class word, so a labelled-folder
reader (mmgen.data.captions.LabelledImageFolder) sees the same class names as classes.txt (in sorted order).

    python bench/real_data.py digits --out data/digits
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mmgen.data.split import split_indices
from mmgen.errors import UserError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# training captions: {word} is the class word, {numeral} the digit
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {numeral}",
    "a handwritten {numeral}",
    "the digit {word} written by hand",
    "a scanned digit {word}",
    "the number {word}",
)
# zero-shot prompts, filled with a class name (a word) as mmgen.clip.zeroshot does
ZEROSHOT_TEMPLATES = ("a handwritten digit {}", "the digit {} written by hand", "the number {}")
SOURCE = ("scikit-learn's load_digits: UCI Optical Recognition of Handwritten Digits (E. Alpaydin, C. Kaynak, 1998), "
          "test part, CC BY 4.0")


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 8, 8) uint8 in 0..255, labels (n,) int64) of scikit-learn's digits; UserError without sklearn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits data ships with scikit-learn: pip install -e \".[bench]\" "
                        "(or pip install scikit-learn)") from None
    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255 / 16)), 0, 255).astype(np.uint8)  # 0..16 ink levels -> 0..255
    return images, digits.target.astype(np.int64)


def stratified_split(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), both sorted: each class's items shuffled with `seed`, the first
    round(val_fraction * count) of them held out (mmgen.data.split.split_indices)."""
    train, val = split_indices(len(labels), val_fraction, seed, groups=[int(label) for label in labels])
    return np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64)


def digit_caption(label: int, rng: np.random.Generator) -> str:
    """One caption naming digit `label` in a phrasing drawn from `rng`."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(word=DIGIT_WORDS[label], numeral=label)


def upscale(image: np.ndarray, size: int) -> Image.Image:
    """A (h, w) uint8 array as a grey PIL image of size x size (bicubic)."""
    return Image.fromarray(image, mode="L").resize((size, size), Image.Resampling.BICUBIC)


def write_digits(out: str | Path, *, size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                 limit: int | None = None) -> dict:
    """Write the digits as captioned image folders + CSVs under `out` (see the module docstring), atomically;
    `limit` keeps only the first `limit` images (tests). Returns the info.json contents."""
    from mmgen.io import atomic_folder  # imports torch: not needed for --help

    if size < 8:
        raise UserError(f"--size must be >= 8 (the scans are 8x8), got {size}")
    images, labels = load_digits_arrays()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    splits = dict(zip(("train", "val"), stratified_split(labels, val_fraction, seed)))
    caption_rng = np.random.default_rng([seed, 1])
    info = {"name": "digits", "source": SOURCE, "image_size": size, "seed": seed, "val_fraction": val_fraction,
            "classes": list(DIGIT_WORDS), "caption_templates": list(CAPTION_TEMPLATES),
            "zeroshot_templates": list(ZEROSHOT_TEMPLATES), "counts": {}, "date": time.strftime("%Y-%m-%d")}
    with atomic_folder(Path(out)) as staging:
        for split, indices in splits.items():
            rows = []
            for index in indices:
                label = int(labels[index])
                relative = f"{split}/{DIGIT_WORDS[label]}/{index:04d}.png"
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                upscale(images[index], size).save(staging / relative)
                rows.append({"image": relative, "caption": digit_caption(label, caption_rng), "label": label,
                             "class": DIGIT_WORDS[label]})
            _write_csv(staging / f"{split}.csv", rows)
            info["counts"][split] = len(rows)
        (staging / "classes.txt").write_text("\n".join(DIGIT_WORDS) + "\n")
        (staging / "zeroshot_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
        (staging / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["image", "caption", "label", "class"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def read_split(folder: str | Path, split: str) -> tuple[list[Path], list[int]]:
    """(image paths, labels) of OUT/<split>.csv as written by write_digits."""
    table = Path(folder) / f"{split}.csv"
    if not table.is_file():
        raise UserError(f"{table} not found; write the data first: python bench/real_data.py digits --out {folder}")
    with open(table, newline="") as file:
        rows = list(csv.DictReader(file))
    return [table.parent / row["image"] for row in rows], [int(row["label"]) for row in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["digits"], help="which data set to write")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist yet)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split and the caption phrasings")
    args = parser.parse_args(argv)
    try:
        if args.out.exists():
            raise UserError(f"{args.out} already exists; pick a new --out folder")
        info = write_digits(args.out, size=args.size, val_fraction=args.val_fraction, seed=args.seed)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    print(f"wrote {args.out}: {info['counts']['train']} train / {info['counts']['val']} val images at "
          f"{args.size}x{args.size}; try: mmgen train clip --config configs/clip-own-data.yaml --out runs/clip-digits "
          f"data.train={args.out}/train.csv data.val={args.out}/val.csv data.zeroshot={args.out}/val")


if __name__ == "__main__":
    main()
