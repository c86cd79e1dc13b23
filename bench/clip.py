"""CLIP speed against open_clip, same architecture, same batch, same optimizer, same run, interleaved:

- training throughput: images/s of forward (both towers) + InfoNCE + backward + AdamW step;
- encode-only throughput: images/s of encode_image + encode_text on a batch of image–caption pairs, no gradients.

Each library uses its own model and its own InfoNCE loss; the ratio mmgen / open_clip is reported (> 1: mmgen is
faster). Nothing is downloaded: models have random weights, which do not change the speed.

    python bench/clip.py                                    # configs/clip-shapes.yaml's CLIP, its batch, CPU
    python bench/clip.py --model ViT-B-32 --batch-size 16   # open_clip's ViT-B/32 shape on CPU
    python bench/clip.py --model ViT-B-32 --batch-size 256 --device cuda --dtype bf16   # GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import yaml
from timing import interleaved_seconds

REPOSITORY = Path(__file__).resolve().parents[1]
SHAPES_CONFIG = REPOSITORY / "configs" / "clip-shapes.yaml"


def build_models(name: str, device: str):
    """(mmgen CLIP, open_clip model) with equal weights: the shapes recipe's CLIP, or an open_clip model by name."""
    import open_clip

    from mmgen.clip import CLIP
    from mmgen.clip.open_clip_interop import from_open_clip, to_open_clip
    from mmgen.config import from_dict
    from mmgen.recipes.clip import CLIPRecipe

    torch.manual_seed(0)
    if name == "shapes":
        ours = CLIP(from_dict(CLIPRecipe, yaml.safe_load(SHAPES_CONFIG.read_text())).model)
        theirs = to_open_clip(ours)
    else:
        theirs = open_clip.create_model(name, pretrained=None)
        ours = from_open_clip(theirs)
    return ours.to(device), theirs.to(device)


def batch_of(model, batch_size: int, device: str):
    """Random images (normal, like normalised pixels) and captions of random token ids with start/end tokens."""
    size, context = model.config.vision.image_size, model.config.text.context_length
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    lengths = torch.randint(3, context + 1, (batch_size,), generator=generator)
    tokens = torch.zeros(batch_size, context, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        tokens[row, :length] = torch.randint(1, 49406, (length,), generator=generator)
        tokens[row, 0], tokens[row, length - 1] = 49406, 49407
    return images.to(device), tokens.to(device)


def train_step(model, loss_fn, images, tokens, autocast):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()

    def step():
        with autocast():
            image_features, text_features, logit_scale = model(images, tokens)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def encode_step(model, images, tokens, autocast):
    def step():
        model.eval()
        with torch.inference_mode(), autocast():
            model.encode_image(images, normalize=True)
            model.encode_text(tokens, normalize=True)
    return step


def compare(steps: dict, batch_size: int, repeats: int, iterations: int, device: str) -> dict:
    """Images/s of each step: the median over `repeats` interleaved rounds of `iterations` calls."""
    seconds = interleaved_seconds(steps, repeats, iterations, torch.device(device))
    return {name: batch_size / statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="'shapes' (configs/clip-shapes.yaml) or an open_clip name")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the shapes recipe's, or 16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, as AMP training")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/clip_<model>_<device>.json")
    args = parser.parse_args()
    if args.batch_size is None:
        args.batch_size = yaml.safe_load(SHAPES_CONFIG.read_text())["train"]["batch_size"] if args.model == "shapes" else 16
    if args.batch_size < 2 or args.repeats < 1 or args.iterations < 1:
        parser.error("--batch-size must be >= 2, --repeats and --iterations >= 1")

    from open_clip.loss import ClipLoss as OpenClipLoss

    from mmgen.clip import ClipLoss

    device_type = args.device.split(":")[0]
    autocast = ((lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if args.dtype == "bf16"
                else contextlib.nullcontext)
    ours, theirs = build_models(args.model, args.device)
    images, tokens = batch_of(ours, args.batch_size, args.device)
    train = compare({"mmgen": train_step(ours, ClipLoss(), images, tokens, autocast),
                     "open_clip": train_step(theirs, OpenClipLoss(), images, tokens, autocast)},
                    args.batch_size, args.repeats, args.iterations, args.device)
    encode = compare({"mmgen": encode_step(ours, images, tokens, autocast),
                      "open_clip": encode_step(theirs, images, tokens, autocast)},
                     args.batch_size, args.repeats, args.iterations, args.device)
    results = {
        "date": time.strftime("%Y-%m-%d"), "model": args.model, "device": args.device, "dtype": args.dtype,
        "cpu_threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "parameters_M": sum(p.numel() for p in ours.parameters()) / 1e6,
        "train_images_per_s": train, "train_ratio": train["mmgen"] / train["open_clip"],
        "encode_images_per_s": encode, "encode_ratio": encode["mmgen"] / encode["open_clip"],
    }
    print(json.dumps(results, indent=2))
    out = args.out or REPOSITORY / "bench" / "results" / f"clip_{args.model}_{device_type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
