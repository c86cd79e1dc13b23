"""How close an unCLIP prior's sampled image embeddings come to the true ones, on held-out shapes captions.

For each of `--count` held-out (caption, image) pairs of shapes:val (shape x colour pairs never seen in training),
the mean cosine similarity between the prior's sampled CLIP image embedding for the caption and the true CLIP image
embedding of the image, per sampler setting (DDIM steps, classifier-free guidance). The baseline is the caption's
own (unit-length) CLIP text embedding used as the image embedding: what a decoder would get without a prior. The
prior has to beat it. Beside it, as DALLE2-pytorch's prior.md reports them: the sampled embedding's cosine to the
caption's text embedding, and to an unrelated pair's true image embedding (must stay low: a prior that ignores its
caption scores there as high as on its own image).

    python bench/prior.py --checkpoint runs/prior-shapes
    python bench/prior.py --checkpoint runs/prior-shapes --settings 64:1,64:2,64:4 --count 1024
    python bench/prior.py --checkpoint RUN --quick                     # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusion_fidelity import machine

from mmgen.data.captions import build_caption_dataset
from mmgen.errors import UserError
from mmgen.io import atomic_write_text
from mmgen.pipelines.unclip import PriorPipeline
from mmgen.recipes.prior import embedding_similarity
from mmgen.recipes.unclip import held_out_pairs

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "bench" / "results"
DEFAULT_SETTINGS = "64:1,64:2,64:4,25:2"
QUICK_SETTINGS = "10:1,10:2"


def parse_settings(text: str) -> list[dict]:
    """"64:2,25:1" -> [{"name": "64:2", "steps": 64, "guidance_scale": 2.0}, ...]."""
    settings = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        try:
            steps, guidance = int(parts[0]), float(parts[1])
        except (IndexError, ValueError):
            raise UserError(f"bad setting {item!r}: expected STEPS:GUIDANCE, e.g. 64:2") from None
        if len(parts) != 2 or steps < 1 or guidance < 0:
            raise UserError(f"bad setting {item!r}: steps >= 1, guidance >= 0")
        settings.append({"name": item, "steps": steps, "guidance_scale": guidance})
    if not settings:
        raise UserError("no sampler setting given")
    return settings


def run(args: argparse.Namespace) -> dict:
    settings = parse_settings(args.settings or (QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS))
    count = args.count or (32 if args.quick else 256)
    prior = PriorPipeline.from_pretrained(args.checkpoint, device=args.device).prior
    clip_size = prior.config.clip.vision.image_size
    dataset = build_caption_dataset(f"shapes:val:{count}", split="val", train=False, image_size=clip_size,
                                    normalize="clip", seed=args.seed)
    images, captions = held_out_pairs(dataset, count)
    results = {
        "checkpoint": str(args.checkpoint), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
        "device": args.device, "pairs": len(captions), "examples": captions[:4], "seed": args.seed,
        "prediction_type": prior.schedule.prediction_type, "command": " ".join(sys.argv), "settings": [],
    }
    for setting in settings:
        start = time.perf_counter()
        similarity = embedding_similarity(prior, images, captions, steps=setting["steps"],
                                          guidance_scale=setting["guidance_scale"], seed=args.seed,
                                          batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        results["text_embedding_baseline"] = similarity["cosine_text_baseline"]
        results["settings"].append({**setting, "cosine": similarity["cosine"],
                                    "cosine_text": similarity["cosine_text"],
                                    "cosine_unrelated": similarity.get("cosine_unrelated"),
                                    "seconds": round(seconds, 2)})
        print(f"{setting['name']}: {seconds:.1f}s", file=sys.stderr)
    best = max(results["settings"], key=lambda s: s["cosine"])
    results["best"] = {"setting": best["name"], "cosine": best["cosine"],
                       "beats_baseline": best["cosine"] > results["text_embedding_baseline"]}
    return results


def print_table(results: dict) -> None:
    print("mean cosine of the embedding to: its true image embedding / its caption's text embedding / an unrelated "
          "pair's image embedding")
    print(f"{'setting (steps:guidance)':<28}{'true image':>12}{'text':>12}{'unrelated':>12}")
    print(f"{'text embedding (baseline)':<28}{results['text_embedding_baseline']:>12.4f}{1.0:>12.4f}{'':>12}")
    for setting in results["settings"]:
        unrelated = setting["cosine_unrelated"]
        print(f"{'prior ' + setting['name']:<28}{setting['cosine']:>12.4f}{setting['cosine_text']:>12.4f}"
              f"{unrelated if unrelated is not None else float('nan'):>12.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="prior run or model folder")
    parser.add_argument("--settings", help=f"STEPS:GUIDANCE,... of the prior's DDIM (default {DEFAULT_SETTINGS})")
    parser.add_argument("--count", type=int, help="held-out pairs (default 256; 32 with --quick)")
    parser.add_argument("--batch-size", type=int, default=256, help="captions per pipeline call")
    parser.add_argument("--seed", type=int, default=0, help="seeds the held-out pairs and the sampler")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 32 pairs, two 10-step settings")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/prior.json; "
                                                  "prior_quick.json with --quick)")
    args = parser.parse_args()
    if args.batch_size < 1 or (args.count is not None and args.count < 1):
        parser.error("--count and --batch-size must be >= 1")
    try:
        results = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    print_table(results)
    out = args.out or RESULTS / ("prior_quick.json" if args.quick else "prior.json")
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
