"""An independent judge of generated handwritten digits: a small CNN trained on the REAL digits train split only
(bench/real_data.py writes it; never on generated images), its accuracy measured on the held-out split.

Not mmgen's CLIP, which would grade its own homework. `prompt_fidelity` scores generated images against the classes
their prompts named (overall and per class); `class_grid` saves one row of images per class as a PNG.

    python bench/real_data.py digits --out data/digits
    python bench/digits_judge.py --data data/digits            # trains (about a minute on one core) or loads the cache

The trained judge is cached in bench/results/digits-judge/ (model.safetensors + judge.json, keyed by its config and
the data's info.json), and retrained when either changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from judge import to_batch
from PIL import Image, ImageDraw
from real_data import DIGIT_WORDS, read_split
from torch import nn
from torch.nn import functional as F

from mmgen.errors import UserError
from mmgen.io import atomic_folder, load_tensors, read_json, save_tensors, write_json

REPOSITORY = Path(__file__).resolve().parents[1]
CACHE = REPOSITORY / "bench" / "results" / "digits-judge"
JUDGE_VERSION = 1  # bump when the network or its training changes: cached judges are retrained


@dataclass(frozen=True)
class DigitsJudgeConfig:
    """The judge's input size, widths and training recipe; all of it is part of the cache key."""

    image_size: int = 32
    widths: tuple[int, ...] = (32, 64, 128)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    version: int = JUDGE_VERSION

    def to_dict(self) -> dict:
        """JSON-ready values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class DigitsNet(nn.Module):
    """Conv blocks (two 3x3 convs + BatchNorm + max-pool each), global average pool, one linear layer to 10 logits.
    Reads the mean of the RGB channels, so grey and colour samples are judged alike."""

    def __init__(self, config: DigitsJudgeConfig):
        super().__init__()
        layers, channels = [], 1
        for width in config.widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, len(DIGIT_WORDS))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (batch, 3, size, size) in [0, 1] -> logits (batch, 10)."""
        grey = images.mean(dim=1, keepdim=True) * 2 - 1  # (batch, 1, size, size)
        return self.head(self.features(grey))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine jitter (rotation +-10 degrees, scale 0.9-1.1, shift +-2 px), brightness +-10% and pixel noise:
    the variation a sampler's digits may have that the 1,438 scans lack."""
    batch, size = images.shape[0], images.shape[-1]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, generator=generator)

    angle = uniform(-10, 10) * torch.pi / 180
    scale = uniform(0.9, 1.1)
    shift = uniform(-2, 2), uniform(-2, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[0] * 2 / size], 1),
                         torch.stack([sin, cos, shift[1] * 2 / size], 1)], 1)  # (batch, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    images = images * uniform(0.9, 1.1).view(batch, 1, 1, 1)
    images = images + 0.03 * torch.rand(batch, 1, 1, 1, generator=generator) * torch.randn(
        images.shape, generator=generator)
    return images.clamp(0, 1)


def load_images(paths: Sequence[Path], image_size: int) -> torch.Tensor:
    """(n, 3, size, size) float images in [0, 1] from files."""
    return to_batch([Image.open(path) for path in paths], image_size)


class DigitsJudge:
    """A trained DigitsNet: `predict` gives a class index per image."""

    def __init__(self, net: DigitsNet, config: DigitsJudgeConfig, report: dict | None = None):
        self.net = net.eval()
        self.config = config
        self.report = report or {}

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 256) -> list[int]:
        """One class index (0-9) per image; PIL images or a (batch, 3, h, w) tensor in [0, 1] (or uint8)."""
        batch = to_batch(images, self.config.image_size)
        return [index for start in range(0, len(batch), batch_size)
                for index in self.net(batch[start : start + batch_size]).argmax(dim=1).tolist()]


def train_judge(config: DigitsJudgeConfig, images: torch.Tensor, labels: torch.Tensor,
                progress: bool = True) -> DigitsJudge:
    """Fit a DigitsNet on (augmented) real images: AdamW, one-cycle LR, cross-entropy."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    net = DigitsNet(config).train()
    steps_per_epoch = max(1, len(images) // config.batch_size)
    total = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total, pct_start=0.2)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            chosen = order[step * config.batch_size : (step + 1) * config.batch_size]
            loss = F.cross_entropy(net(augment(images[chosen], generator)), labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if progress and ((epoch + 1) % 5 == 0 or epoch + 1 == config.epochs):
            print(f"judge epoch {epoch + 1}/{config.epochs}  loss {loss.item():.4f}  "
                  f"{time.perf_counter() - start:.0f}s", file=sys.stderr)
    return DigitsJudge(net, config, {"train_seconds": round(time.perf_counter() - start, 1)})


def prompt_fidelity(predicted: Sequence[int], intended: Sequence[int]) -> dict:
    """{"overall": share of images judged as the class their prompt named, "per_class": {word: share}} (classes
    with no image are left out), "confused_with": {word: the most frequent wrong class, if any}."""
    if len(predicted) != len(intended):
        raise ValueError(f"{len(predicted)} predictions for {len(intended)} intended classes")
    predicted, intended = np.asarray(predicted), np.asarray(intended)
    per_class, confused = {}, {}
    for label, word in enumerate(DIGIT_WORDS):
        mine = intended == label
        if mine.any():
            per_class[word] = float((predicted[mine] == label).mean())
            wrong = predicted[mine & (predicted != label)]
            if len(wrong):
                confused[word] = DIGIT_WORDS[int(np.bincount(wrong, minlength=10).argmax())]
    overall = float((predicted == intended).mean()) if len(intended) else 0.0
    return {"overall": overall, "per_class": per_class, "confused_with": confused}


def class_grid(images: Sequence[Image.Image], intended: Sequence[int], path: str | Path, *, per_row: int = 8,
               predicted: Sequence[int] | None = None, cell: int = 32) -> Path:
    """Save a PNG with one row per intended class (its word on the left, up to `per_row` images); with `predicted`,
    a wrongly judged image gets a red frame."""
    rows = [[i for i, label in enumerate(intended) if label == c][:per_row] for c in range(len(DIGIT_WORDS))]
    rows = [(c, row) for c, row in enumerate(rows) if row]
    margin, pad = 48, 2
    grid = Image.new("RGB", (margin + per_row * (cell + pad), max(1, len(rows)) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, members) in enumerate(rows):
        top = r * (cell + pad)
        draw.text((4, top + cell // 2 - 6), DIGIT_WORDS[label], fill="black")
        for column, index in enumerate(members):
            left = margin + column * (cell + pad)
            grid.paste(images[index].convert("RGB").resize((cell, cell)), (left, top))
            if predicted is not None and predicted[index] != label:
                draw.rectangle([left, top, left + cell - 1, top + cell - 1], outline="red")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def load_or_train_digits_judge(data: str | Path, cache_dir: str | Path | None = None, *,
                               config: DigitsJudgeConfig | None = None, retrain: bool = False,
                               progress: bool = True) -> DigitsJudge:
    """The judge cached in `cache_dir` if its config and the data's info.json match; otherwise train one on
    DATA's train split, measure it on DATA's val split and cache it (safetensors + JSON, written atomically)."""
    data, config = Path(data), config or DigitsJudgeConfig()
    cache_dir = Path(cache_dir) if cache_dir is not None else CACHE
    if not (data / "info.json").is_file():
        raise UserError(f"{data} holds no info.json; write it with: python bench/real_data.py digits --out {data}")
    data_info = read_json(data / "info.json")
    key = {"config": config.to_dict(), "data": {k: data_info.get(k) for k in ("image_size", "seed", "val_fraction",
                                                                             "counts")}}
    if not retrain and (cache_dir / "judge.json").is_file():
        meta = read_json(cache_dir / "judge.json")
        if {k: meta.get(k) for k in key} == key:
            net = DigitsNet(config)
            net.load_state_dict(load_tensors(cache_dir / "model.safetensors"))
            return DigitsJudge(net, config, meta.get("report"))
        if progress:
            print(f"judge cache {cache_dir} holds another config or data: retraining", file=sys.stderr)
    train_paths, train_labels = read_split(data, "train")
    judge = train_judge(config, load_images(train_paths, config.image_size), torch.tensor(train_labels), progress)
    val_paths, val_labels = read_split(data, "val")
    held_out = prompt_fidelity(judge.predict(load_images(val_paths, config.image_size)), val_labels)
    judge.report.update({"held_out_images": len(val_labels), "held_out_accuracy": held_out["overall"],
                         "held_out_per_class": held_out["per_class"], "train_images": len(train_labels)})
    with atomic_folder(cache_dir) as staging:
        save_tensors(staging / "model.safetensors", judge.net.state_dict())
        write_json(staging / "judge.json", {**key, "report": judge.report, "date": time.strftime("%Y-%m-%d")})
    return judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder written by bench/real_data.py digits")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: bench/results/digits-judge/")
    parser.add_argument("--retrain", action="store_true", help="train even if a matching cached judge exists")
    parser.add_argument("--epochs", type=int, default=DigitsJudgeConfig.epochs)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    try:
        judge = load_or_train_digits_judge(args.data, args.cache_dir, config=DigitsJudgeConfig(epochs=args.epochs),
                                           retrain=args.retrain)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    report = judge.report
    print(f"digits judge: {report['held_out_accuracy']:.4f} held-out accuracy on {report['held_out_images']} real "
          f"images (trained on {report['train_images']} in {report['train_seconds']}s)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
