"""Prompt fidelity of a text-to-image model trained on real handwritten digits, per guidance scale: the share of
samples that an independent judge (bench/digits_judge.py: a CNN trained on the real train split only) reads as the
digit their prompt named, overall and per class, and a sample grid per class (one row per digit) for each scale.

Prompts name each class in the training captions' phrasings (bench/real_data.CAPTION_TEMPLATES, cycled), N per class.
The judge's accuracy on the real held-out images is the ceiling.

    python bench/real_data.py digits --out data/digits
    mmgen train clip --config configs/clip-own-data.yaml --out runs/clip-digits data.train=data/digits/train.csv ...
    mmgen train diffusion --config configs/diffusion-own-data.yaml --out runs/diffusion-digits ...
    python bench/digits_fidelity.py --checkpoint runs/diffusion-digits --data data/digits \\
        --guidance 1 1.5 3 5 7.5 --per-class 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusion_fidelity import generate, machine
from digits_judge import class_grid, load_or_train_digits_judge, prompt_fidelity
from real_data import CAPTION_TEMPLATES, DIGIT_WORDS

from mmgen.diffusion.samplers import SAMPLERS
from mmgen.errors import UserError
from mmgen.io import atomic_write_text
from mmgen.pipelines.text2img import TextToImagePipeline

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "bench" / "results"


def class_prompts(per_class: int) -> tuple[list[str], list[int]]:
    """(prompts, intended classes): `per_class` prompts for each digit, cycling through the caption phrasings."""
    prompts, intended = [], []
    for label, word in enumerate(DIGIT_WORDS):
        for index in range(per_class):
            prompts.append(CAPTION_TEMPLATES[index % len(CAPTION_TEMPLATES)].format(word=word, numeral=label))
            intended.append(label)
    return prompts, intended


def run(args: argparse.Namespace) -> dict:
    """Sample every guidance scale, judge the samples, write the grids; the results as a dict."""
    judge = load_or_train_digits_judge(args.data, args.judge_cache)
    pipeline = TextToImagePipeline.from_pretrained(args.checkpoint, device=args.device)
    prompts, intended = class_prompts(args.per_class)
    results = {
        "checkpoint": str(args.checkpoint), "data": str(args.data), "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(), "device": args.device, "sampler": args.sampler, "steps": args.steps,
        "per_class": args.per_class, "seed": args.seed, "command": " ".join(sys.argv),
        "judge": {"held_out_accuracy": judge.report.get("held_out_accuracy"),
                  "held_out_images": judge.report.get("held_out_images")},
        "guidance": [],
    }
    for scale in args.guidance:
        setting = {"sampler": args.sampler, "steps": args.steps, "guidance_scale": scale}
        start = time.perf_counter()
        images = generate(pipeline, prompts, setting, 1, args.batch_size, args.seed)
        seconds = time.perf_counter() - start
        predicted = judge.predict(images)
        fidelity = prompt_fidelity(predicted, intended)
        grid = class_grid(images, intended, args.grid_dir / f"digits-guidance-{scale:g}.png",
                          per_row=min(args.per_class, 10), predicted=predicted)
        results["guidance"].append({"guidance_scale": scale, "seconds": round(seconds, 1), **fidelity,
                                    "grid": str(grid)})
        print(f"guidance {scale:g}: fidelity {fidelity['overall']:.3f} ({seconds:.0f}s)", file=sys.stderr)
    return results


def print_table(results: dict) -> None:
    print(f"judge's held-out accuracy on real images (the ceiling): {results['judge']['held_out_accuracy']:.4f}")
    print(f"{'guidance':>9}{'fidelity':>10}{'worst class':>18}" + "".join(f"{w:>7}" for w in DIGIT_WORDS))
    for row in results["guidance"]:
        worst = min(row["per_class"], key=row["per_class"].get)
        worst_text = f"{worst} {row['per_class'][worst]:.2f}"
        print(f"{row['guidance_scale']:>9g}{row['overall']:>10.3f}{worst_text:>18}"
              + "".join(f"{row['per_class'].get(w, float('nan')):>7.2f}" for w in DIGIT_WORDS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="text2img run or model folder")
    parser.add_argument("--data", type=Path, default=REPOSITORY / "data" / "digits",
                        help="the digits folder (bench/real_data.py) the judge trains on")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 3.0, 5.0, 7.5])
    parser.add_argument("--per-class", type=int, default=16, help="samples per digit and guidance scale")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=80, help="prompts per pipeline call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--judge-cache", type=Path, help="default: bench/results/digits-judge/")
    parser.add_argument("--grid-dir", type=Path, default=RESULTS / "digits_fidelity",
                        help="where digits-guidance-G.png grids go (e.g. docs/images to publish them)")
    parser.add_argument("--out", type=Path, default=RESULTS / "digits_fidelity.json")
    args = parser.parse_args()
    if args.per_class < 1 or args.steps < 1 or args.batch_size < 1 or min(args.guidance) < 0:
        parser.error("--per-class, --steps and --batch-size must be >= 1 and --guidance >= 0")
    try:
        results = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    print_table(results)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
