"""An independent judge of shape images: a small CNN, trained on real renders, that reads shape, colour, size and
position. It is not part of any model under test; it is what the generation benchmarks score samples with.

It is trained on every shape x colour pair (held-out pairs included: it judges, it does not generalise), with the
renderer's own jitter plus mild blur, noise and colour jitter so that it reads the content of slightly imperfect
samples. The trained judge is cached (model.safetensors + judge.json) and reused while its config matches.

    python bench/judge.py                       # train (or load) the 32px judge, report its accuracy
    python bench/judge.py --image-size 64 --retrain
    python bench/judge.py --extra-shapes heart     # a judge that also reads an extra shape (EXTRA_SHAPES)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from mmgen.data.shapes import COLOURS, EXTRA_SHAPES, POSITIONS, SHAPES, SIZES, render, with_extra_shapes
from mmgen.io import atomic_folder, load_tensors, read_json, save_tensors, write_json

REPOSITORY = Path(__file__).resolve().parents[1]

JUDGE_VERSION = 1  # bump when the network, the training recipe or the renderer changes: cached judges are retrained
RESULTS = REPOSITORY / "bench" / "results"
Renderer = Callable[[dict, int, np.random.Generator], Image.Image]


@dataclass(frozen=True)
class JudgeConfig:
    """What the judge reads (one head per label list) and how it is trained; all of it is part of the cache key."""

    image_size: int = 32
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    sizes: tuple[str, ...] = SIZES
    positions: tuple[str, ...] = POSITIONS
    widths: tuple[int, ...] = (16, 32, 64)
    steps: int = 400
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0
    version: int = JUDGE_VERSION

    @property
    def heads(self) -> dict[str, tuple[str, ...]]:
        """Head name (an attribute of `render`) -> its labels, in logit order."""
        return {"shape": self.shapes, "colour": self.colours, "size": self.sizes, "position": self.positions}

    def to_dict(self) -> dict:
        """The config as JSON-ready values (tuples become lists)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items()}


class JudgeNet(nn.Module):
    """Conv blocks (two 3x3 convs + max-pool each), pooled to a 4x4 grid (keeps position), one head per label set."""

    def __init__(self, config: JudgeConfig):
        super().__init__()
        layers, channels = [], 3
        for width in config.widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.trunk = nn.Sequential(nn.Linear(channels * 16, 128), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(labels)) for name, labels in config.heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (batch, 3, size, size) in [0, 1] -> {head: logits (batch, labels)}."""
        hidden = self.trunk(self.features(images * 2 - 1))
        return {name: head(hidden) for name, head in self.heads.items()}


def to_batch(images: Sequence[Image.Image] | torch.Tensor, image_size: int) -> torch.Tensor:
    """PIL images (any size and mode) or a (batch, 3, h, w) tensor (float in [0, 1], or uint8) -> (batch, 3, size, size)
    float in [0, 1], resized with antialiasing where the size differs."""
    if isinstance(images, torch.Tensor):
        batch = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected images shaped (batch, 3, height, width), got {tuple(batch.shape)}")
        if batch.shape[-2:] != (image_size, image_size):
            batch = F.interpolate(batch, size=(image_size, image_size), mode="bilinear", antialias=True,
                                  align_corners=False)
        return batch.clamp(0, 1)
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BOX if image.width > image_size
                                 else Image.Resampling.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.float32) / 255)
    if not arrays:
        return torch.zeros(0, 3, image_size, image_size)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class Judge:
    """A trained JudgeNet and its config; `predict` reads images, `accuracy` scores them against attributes."""

    def __init__(self, net: JudgeNet, config: JudgeConfig, report: dict | None = None):
        self.net = net.eval()
        self.config = config
        self.report = report or {}  # accuracy on fresh renders and training time, as cached

    @property
    def heads(self) -> dict[str, tuple[str, ...]]:
        """Head name -> its labels (see JudgeConfig.heads)."""
        return self.config.heads

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """{"shape": [...], "colour": [...], "size": [...], "position": [...]}: one label per image."""
        batch = to_batch(images, self.config.image_size)
        predictions = {name: [] for name in self.heads}
        for start in range(0, len(batch), batch_size):
            logits = self.net(batch[start : start + batch_size])
            for name, labels in self.heads.items():
                predictions[name] += [labels[index] for index in logits[name].argmax(dim=1).tolist()]
        return predictions

    def accuracy(self, images, attributes: list[dict]) -> dict[str, float]:
        """Fraction of images whose predicted attribute matches, per head, plus "shape+colour" (both right)."""
        return score(self.predict(images), attributes)


def score(predictions: dict[str, list[str]], attributes: list[dict]) -> dict[str, float]:
    """Per-head fraction of `predictions` equal to `attributes`, plus "shape+colour" (both right at once)."""
    count = max(1, len(attributes))
    hits = {name: [p == a[name] for p, a in zip(labels, attributes)] for name, labels in predictions.items()}
    result = {name: sum(flags) / count for name, flags in hits.items()}
    result["shape+colour"] = sum(s and c for s, c in zip(hits["shape"], hits["colour"])) / count
    return result


def sample_attributes(config: JudgeConfig, count: int, rng: np.random.Generator) -> list[dict]:
    """`count` attribute dicts drawn uniformly from every label of every head (all shape x colour pairs)."""
    return [{name: labels[rng.integers(len(labels))] for name, labels in config.heads.items()} for _ in range(count)]


def render_batch(attributes: list[dict], image_size: int, rng: np.random.Generator,
                 renderer: Renderer = render) -> torch.Tensor:
    """(batch, 3, size, size) float renders of `attributes`, with the renderer's jitter drawn from `rng`."""
    return to_batch([renderer(a, image_size, rng) for a in attributes], image_size)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild corruptions a sampler's output may have: colour jitter, Gaussian blur (half the images), pixel noise."""
    batch = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, *shape, 1, 1, generator=generator)

    # colour: overall brightness +-8%, per-channel gain +-4%, per-channel offset +-0.02
    images = images * uniform(0.92, 1.08, 1) * uniform(0.96, 1.04, 3) + uniform(-0.02, 0.02, 3)
    # blur: a separable 5-tap Gaussian, sigma up to 0.7 px, one kernel per image (grouped convolution)
    sigma = uniform(0.05, 0.7, 1).view(batch, 1) * (torch.rand(batch, 1, generator=generator) < 0.5)
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-taps**2 / (2 * sigma.clamp(min=1e-3) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0)  # (batch * 3, 5)
    flat = images.reshape(1, batch * 3, *images.shape[-2:])
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), kernel.view(-1, 1, 1, 5), groups=batch * 3)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), kernel.view(-1, 1, 5, 1), groups=batch * 3)
    images = flat.view_as(images)
    # noise: Gaussian, standard deviation up to 0.04
    images = images + uniform(0.0, 0.04, 1) * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)


def train_judge(config: JudgeConfig, renderer: Renderer = render, progress: bool = True) -> Judge:
    """Train a JudgeNet on fresh augmented renders of uniformly drawn attributes (one-cycle AdamW, summed CE)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 0])
    net = JudgeNet(config).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                                   pct_start=0.2)
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        attributes = sample_attributes(config, config.batch_size, rng)
        images = augment(render_batch(attributes, config.image_size, rng, renderer), generator)
        logits = net(images)
        loss = sum(F.cross_entropy(logits[name], torch.tensor([labels.index(a[name]) for a in attributes]))
                   for name, labels in config.heads.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress and (step % 50 == 0 or step == config.steps):
            print(f"judge step {step}/{config.steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s",
                  file=sys.stderr)
    return Judge(net, config, {"train_seconds": round(time.perf_counter() - start, 1)})


def evaluate_judge(judge: Judge, count: int = 2000, seed: int = 1, renderer: Renderer = render) -> dict:
    """The judge's accuracy on `count` fresh renders (a seed training never uses), clean and augmented."""
    rng = np.random.default_rng([seed, 1])
    attributes = sample_attributes(judge.config, count, rng)
    images = render_batch(attributes, judge.config.image_size, rng, renderer)
    augmented = augment(images, torch.Generator().manual_seed(seed))
    return {"renders": count, "clean": judge.accuracy(images, attributes),
            "augmented": judge.accuracy(augmented, attributes)}


def default_cache_dir(config: JudgeConfig) -> Path:
    """bench/results/judge-<size>px/, with the extra shape names appended when the shapes are not the built-in ones."""
    extra = [shape for shape in config.shapes if shape not in SHAPES]
    suffix = "" if config.shapes == SHAPES else "-" + "-".join(extra or [f"{len(config.shapes)}shapes"])
    return RESULTS / f"judge-{config.image_size}px{suffix}"


def load_or_train_judge(image_size: int = 32, cache_dir: str | Path | None = None, *,
                        shapes: Sequence[str] = SHAPES, renderer: Renderer = render, retrain: bool = False,
                        progress: bool = True) -> Judge:
    """The cached judge for `image_size` and `shapes` if one with the same config (version included) is in
    `cache_dir`; otherwise train one (a minute or two on CPU), measure its accuracy and cache it there.

    mmgen.data.shapes.render draws SHAPES and the opt-in EXTRA_SHAPES (e.g. shapes=SHAPES + ("heart",)); other shape
    names need a `renderer` that can draw them."""
    config = JudgeConfig(image_size=image_size, shapes=tuple(shapes))
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(config)
    if not retrain and (cache_dir / "judge.json").is_file():
        meta = read_json(cache_dir / "judge.json")
        if meta.get("config") == config.to_dict():  # every field, the version included
            net = JudgeNet(config)
            net.load_state_dict(load_tensors(cache_dir / "model.safetensors"))
            return Judge(net, config, meta.get("report"))
        if progress:
            print(f"judge cache {cache_dir} holds another config: retraining", file=sys.stderr)
    judge = train_judge(config, renderer, progress)
    judge.net.eval()
    judge.report.update(evaluate_judge(judge, renderer=renderer))
    with atomic_folder(cache_dir) as staging:
        save_tensors(staging / "model.safetensors", judge.net.state_dict())
        write_json(staging / "judge.json", {"config": config.to_dict(), "report": judge.report,
                                            "date": time.strftime("%Y-%m-%d")})
    return judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: bench/results/judge-<size>px/")
    parser.add_argument("--retrain", action="store_true", help="train even if a matching cached judge exists")
    parser.add_argument("--eval-renders", type=int, default=2000, help="fresh renders to re-measure accuracy on")
    parser.add_argument("--extra-shapes", default="", help=f"comma-separated extra shapes to read too "
                                                           f"({', '.join(EXTRA_SHAPES)})")
    args = parser.parse_args()
    start = time.perf_counter()
    shapes = with_extra_shapes([name for name in args.extra_shapes.split(",") if name])
    judge = load_or_train_judge(args.image_size, args.cache_dir, shapes=shapes, retrain=args.retrain)
    loaded_s = time.perf_counter() - start
    evaluation = evaluate_judge(judge, args.eval_renders, seed=2)
    print(f"judge {args.image_size}px: trained in {judge.report.get('train_seconds', '?')}s "
          f"(this run: {loaded_s:.1f}s to load or train); accuracy on {args.eval_renders} fresh renders")
    heads = list(evaluation["clean"])
    print(f"{'':<10}" + "".join(f"{name:>14}" for name in heads))
    for kind in ("clean", "augmented"):
        print(f"{kind:<10}" + "".join(f"{evaluation[kind][name]:>14.4f}" for name in heads))
    print(json.dumps({"cached_report": judge.report, "this_run": evaluation}))


if __name__ == "__main__":
    main()
