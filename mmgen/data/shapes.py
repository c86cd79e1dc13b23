"""Synthetic image-caption data: one coloured shape on a plain background, e.g. "a small red circle at the top left".

Item i of a split is drawn from a generator seeded by (seed, split, i) and rendered on the fly; nothing is stored.
Held-out compositions: a fixed seeded ~20% of the shape x colour pairs never appears in the "train" split, and
the "val" split draws only from them (every size and position occurs in both splits). Every shape and every colour
still occurs in train, so val measures compositional generalisation: zero-shot classification over the
shape x colour classes (`class_names()`) and retrieval with captions of unseen combinations.

Extra shapes (EXTRA_SHAPES: "heart", "hexagon", "pentagon") are opt-in classes for teaching a trained model a shape
it never saw: `ShapesDataset(..., extra_shapes=("heart",))`, or the data spec "shapes:train:2000:extra=heart". They
come after SHAPES in the label order and hold out their own seeded colours, so the default datasets (renders,
captions, labels, held-out pairs) are exactly what they are without them. `extra_fraction` (spec
"...:extra=heart:extra_fraction=0.5") sets the share of items showing an extra shape (default: its share of the
pairs, ~1/7 for one extra shape), as DreamBooth-style fine-tuning mixes new-concept and old ("prior") images.
To add another one, add its outline to EXTRA_OUTLINES (and retrain bench/judge.py's judge with it).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..errors import ConfigError
from .images import tensor_transform

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # a 3x3 grid, row by row
SPLITS = ("train", "val")
DEFAULT_SIZES = {"train": 100_000, "val": 1_000}  # items per split (an epoch); all rendered on the fly
DEFAULT_HELDOUT_FRACTION = 0.2

COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
}
SIZE_FRACTION = {"small": 0.55, "large": 0.95}  # the shape's extent as a fraction of its grid cell


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    angles = [-math.pi / 2 + k * math.pi / points for k in range(2 * points)]
    return [((1.0 if k % 2 == 0 else inner) * math.cos(a), (1.0 if k % 2 == 0 else inner) * math.sin(a))
            for k, a in enumerate(angles)]


def _cross(arm: float = 0.33) -> list[tuple[float, float]]:
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def _regular_polygon(corners: int) -> list[tuple[float, float]]:
    return [(math.cos(-math.pi / 2 + 2 * math.pi * k / corners), math.sin(-math.pi / 2 + 2 * math.pi * k / corners))
            for k in range(corners)]


def _heart(points: int = 48) -> list[tuple[float, float]]:
    # the classic parametric heart (y flipped: the point at the bottom), centred and scaled into [-1, 1]^2
    curve = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
             for t in (2 * math.pi * k / points for k in range(points))]
    top, bottom = min(y for _, y in curve), max(y for _, y in curve)
    half = max(16.0, (bottom - top) / 2)
    return [(x / half, (y - (top + bottom) / 2) / half) for x, y in curve]


# outlines in unit coordinates: the shape fills [-1, 1]^2 around its centre (y points down)
_OUTLINES = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)],
    "star": _star(),
    "cross": _cross(),
    "diamond": [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)],
}
# opt-in shapes that SHAPES (and so every default dataset) leaves out; see the module docstring
EXTRA_OUTLINES = {
    "heart": _heart(),
    "hexagon": _regular_polygon(6),
    "pentagon": _regular_polygon(5),
}
EXTRA_SHAPES = tuple(EXTRA_OUTLINES)


def with_extra_shapes(extra_shapes: Sequence[str] = ()) -> tuple[str, ...]:
    """SHAPES followed by the named EXTRA_SHAPES; an unknown or repeated name is a ConfigError."""
    for shape in extra_shapes:
        if shape not in EXTRA_SHAPES:
            raise ConfigError(f"unknown extra shape {shape!r} (extra shapes: {', '.join(EXTRA_SHAPES)})")
    if len(set(extra_shapes)) != len(extra_shapes):
        raise ConfigError(f"extra shapes repeat a name: {', '.join(extra_shapes)}")
    return SHAPES + tuple(extra_shapes)


def class_names(shapes: Sequence[str] = SHAPES) -> list[str]:
    """The shape x colour classes, e.g. "red circle", in label order (label = shape index * colours + colour index)."""
    return [f"{colour} {shape}" for shape in shapes for colour in COLOURS]


def class_index(shape: str, colour: str, shapes: Sequence[str] = SHAPES) -> int:
    """The label of a shape x colour pair (its position in `class_names(shapes)`)."""
    return list(shapes).index(shape) * len(COLOURS) + COLOURS.index(colour)


def position_phrase(position: str) -> str:
    """The phrase for a position: "at the top left", "on the left", "in the center", ..."""
    if position == "center":
        return "in the center"
    return ("on the " if position in ("left", "right") else "at the ") + position


def caption(attributes: dict, omit: tuple[str, ...] = ()) -> str:
    """The caption of a shape, "a small red circle at the top left", leaving out the attributes in `omit`."""
    a = attributes
    words = ["a"]
    if "size" not in omit:
        words.append(a["size"])
    if "colour" not in omit:
        words.append(a["colour"])
    words.append("shape" if "shape" in omit else a["shape"])
    if "position" not in omit:
        words.append(position_phrase(a["position"]))
    return " ".join(words)


# partial captions name a subset of the attributes, like real captions do; learning that "a red shape" and
# "a circle" both describe a red circle is what lets CLIP recognise colour/shape pairs it never saw together
# (forms without colour are listed several times: colour is learned first and fastest, and a caption without it,
# shown with a grey image, is what makes the model read shape independently of colour; see docs/benchmarks.md)
PARTIAL_CAPTIONS = (("position",), ("size",), ("size", "position"), ("shape",), ("colour",), ("colour",),
                    ("colour",), ("colour",), ("colour", "position"), ("colour", "position"), ("colour", "size"))


def heldout_pairs(fraction: float = DEFAULT_HELDOUT_FRACTION, seed: int = 0) -> frozenset[tuple[str, str]]:
    """A seeded ~`fraction` of the (shape, colour) pairs, spread evenly (at most ceil(count / shapes) per shape and
    ceil(count / colours) per colour) so that every shape and every colour still occurs in train."""
    if not 0.0 < fraction <= 0.5:
        raise ConfigError(f"heldout_fraction must lie in (0, 0.5], got {fraction}")
    pairs = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    count = max(1, round(fraction * len(pairs)))
    per_shape, per_colour = math.ceil(count / len(SHAPES)), math.ceil(count / len(COLOURS))
    chosen: list[tuple[str, str]] = []
    for index in np.random.default_rng(seed).permutation(len(pairs)):
        shape, colour = pairs[index]
        if (sum(s == shape for s, _ in chosen) < per_shape and sum(c == colour for _, c in chosen) < per_colour
                and len(chosen) < count):
            chosen.append((shape, colour))
    return frozenset(chosen)


def heldout_extra_pairs(extra_shapes: Sequence[str], fraction: float = DEFAULT_HELDOUT_FRACTION,
                        seed: int = 0) -> frozenset[tuple[str, str]]:
    """For each extra shape, a seeded ~`fraction` of the colours (at least one) held out of train, drawn apart from
    `heldout_pairs` so that adding an extra shape never changes the built-in shapes' held-out pairs."""
    count = max(1, round(fraction * len(COLOURS)))
    chosen = set()
    for shape in extra_shapes:
        order = np.random.default_rng([seed, 1 + EXTRA_SHAPES.index(shape)]).permutation(len(COLOURS))
        chosen.update((shape, COLOURS[index]) for index in order[:count])
    return frozenset(chosen)


def render(attributes: dict, image_size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw the shape described by `attributes` (shape, colour, size, position) as an RGB image.

    `rng` jitters the background, the exact colour, size, rotation and the place within the grid cell, and adds
    mild pixel noise; the shape always stays inside its cell, so the caption's position stays true."""
    rng = rng if rng is not None else np.random.default_rng(0)
    supersample = 4 if image_size <= 128 else 2  # draw large, then downsample: anti-aliased edges
    canvas_size = image_size * supersample
    grey = int(rng.integers(15, 70))
    background = tuple(int(v) for v in np.clip(grey + rng.integers(-8, 9, size=3), 0, 255))
    canvas = Image.new("RGB", (canvas_size, canvas_size), background)

    cell = canvas_size / 3
    radius = SIZE_FRACTION[attributes["size"]] * cell * rng.uniform(0.9, 1.0) / 2
    slack = cell / 2 - radius
    row, column = divmod(POSITIONS.index(attributes["position"]), 3)
    centre_x = (column + 0.5) * cell + rng.uniform(-slack, slack)
    centre_y = (row + 0.5) * cell + rng.uniform(-slack, slack)
    rgb = np.array(COLOUR_RGB[attributes["colour"]]) + rng.integers(-12, 13, size=3)
    fill = tuple(int(v) for v in np.clip(rgb, 0, 255))
    angle = math.radians(rng.uniform(-10.0, 10.0))

    draw = ImageDraw.Draw(canvas)
    if attributes["shape"] == "circle":
        draw.ellipse((centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius), fill=fill)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        outline = [(centre_x + radius * (x * cos - y * sin), centre_y + radius * (x * sin + y * cos))
                   for x, y in _OUTLINES.get(attributes["shape"]) or EXTRA_OUTLINES[attributes["shape"]]]
        draw.polygon(outline, fill=fill)
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 3.0, size=(image_size, image_size, 3))
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8), mode="RGB")


class ShapesDataset(Dataset):
    """`size` items (default DEFAULT_SIZES[split]) {"image": (3, image_size, image_size) float, "caption": str, "label": shape x colour class}.

    `extra_shapes` (names from EXTRA_SHAPES) add those shapes in every colour, some colours held out as above.

    Deterministic by (seed, split, index). No random crop or flip: positions are part of the captions, so the
    only augmentation is the rendering jitter (see `render`)."""

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        image_size: int = 64,
        seed: int = 0,
        *,
        normalize: str = "clip",
        heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
        heldout_seed: int = 0,
        partial_captions: float | None = None,
        group_size: int = 1,
        grey_without_colour: bool = True,
        extra_shapes: Sequence[str] = (),
        extra_fraction: float | None = None,
    ):
        if split not in SPLITS:
            raise ConfigError(f"shapes split must be one of {', '.join(SPLITS)}, got {split!r}")
        size = DEFAULT_SIZES[split] if size is None else size
        if size < 1 or image_size < 8 or seed < 0:
            raise ConfigError(f"shapes needs size >= 1, image_size >= 8 and seed >= 0, got {size}, {image_size}, {seed}")
        self.split = split
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.shapes = with_extra_shapes(extra_shapes)
        self.heldout = heldout_pairs(heldout_fraction, heldout_seed)
        if extra_shapes:
            self.heldout |= heldout_extra_pairs(extra_shapes, heldout_fraction, heldout_seed)
        all_pairs = [(shape, colour) for shape in self.shapes for colour in COLOURS]
        self.pairs = [pair for pair in all_pairs if (pair in self.heldout) == (split == "val")]
        if extra_fraction is not None:
            if not extra_shapes:
                raise ConfigError("extra_fraction needs extra shapes (e.g. the data spec shapes:train:extra=heart)")
            if not 0.0 < extra_fraction < 1.0:
                raise ConfigError(f"extra_fraction must lie in (0, 1), got {extra_fraction}")
            if group_size > 1:
                raise ConfigError("extra_fraction and hard-negative groups (group_size > 1) do not combine")
        self.extra_fraction = extra_fraction
        # (built-in pairs, extra-shape pairs): the two pools an item is drawn from when extra_fraction is set
        self._pools = ([pair for pair in self.pairs if pair[0] in SHAPES],
                       [pair for pair in self.pairs if pair[0] not in SHAPES])
        if extra_fraction is not None and not all(self._pools):
            raise ConfigError(f"extra_fraction: the {split} split lacks built-in or extra shape pairs to mix")
        self.transform = tensor_transform(normalize)
        # default: 80% of the training captions are partial; evaluation captions are always complete
        self.partial_captions = (0.8 if split == "train" else 0.0) if partial_captions is None else partial_captions
        if not 0.0 <= self.partial_captions <= 1.0:
            raise ConfigError(f"partial_captions must lie in [0, 1], got {self.partial_captions}")

        self.grey_without_colour = grey_without_colour
        # hard negatives: consecutive groups of `group_size` items share colour, size and position and differ only
        # in shape, so a batch made of whole groups can only be told apart by shape (see mmgen.data.groups)
        self.group_size = group_size
        shapes_per_colour = [sum(c == colour for _, c in self.pairs) for colour in COLOURS]
        if group_size < 1 or group_size > min(count for count in shapes_per_colour if count):
            raise ConfigError(f"group_size must lie in [1, {min(c for c in shapes_per_colour if c)}] for the {split} "
                              f"split (the fewest shapes a colour has there), got {group_size}")

    def __len__(self) -> int:
        return self.size

    def _generator(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} shapes")
        return np.random.default_rng([self.seed, SPLITS.index(self.split), index])

    def _draw_attributes(self, rng: np.random.Generator, index: int) -> dict:
        pairs = self.pairs
        if self.extra_fraction is not None:
            pairs = self._pools[int(rng.random() < self.extra_fraction)]
        shape, colour = pairs[rng.integers(len(pairs))]
        if self.group_size > 1:
            group, member = divmod(index, self.group_size)
            rng = np.random.default_rng([self.seed, SPLITS.index(self.split), group, 2])
            colour = sorted({c for _, c in self.pairs})[rng.integers(len({c for _, c in self.pairs}))]
            options = [s for s, c in self.pairs if c == colour]
            shape = options[rng.permutation(len(options))[member]]
        return {
            "shape": shape,
            "colour": colour,
            "size": SIZES[rng.integers(len(SIZES))],
            "position": POSITIONS[rng.integers(len(POSITIONS))],
        }

    def attributes(self, index: int) -> dict:
        """Item `index`'s labels: dict(shape=..., colour=..., size=..., position=...), without rendering it."""
        return self._draw_attributes(self._generator(index), index)

    def image(self, index: int) -> Image.Image:
        """Item `index` as a PIL image (the same pixels `__getitem__` turns into a tensor)."""
        rng = self._generator(index)
        return render(self._draw_attributes(rng, index), self.image_size, rng)

    def _omitted(self, index: int) -> tuple[str, ...]:
        """The attributes item `index`'s caption leaves out (none for a complete caption)."""
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index, 1])
        if rng.random() < self.partial_captions:
            return PARTIAL_CAPTIONS[rng.integers(len(PARTIAL_CAPTIONS))]
        return ()

    def caption(self, index: int) -> str:
        """Item `index`'s caption: complete, or (with probability `partial_captions`) naming only some attributes."""
        return caption(self.attributes(index), self._omitted(index))

    def __getitem__(self, index: int) -> dict:
        rng = self._generator(index)
        attributes = self._draw_attributes(rng, index)
        omitted = self._omitted(index)
        image = render(attributes, self.image_size, rng)
        if self.grey_without_colour and "colour" in omitted:
            # a caption without a colour gets a grey image: shape must then be read from brightness, which
            # transfers to colours the shape was never seen in (no held-out colour/shape image is ever made)
            image = image.convert("L").convert("RGB")
        return {
            "image": self.transform(image),
            "caption": caption(attributes, omitted),
            "label": class_index(attributes["shape"], attributes["colour"], self.shapes),
        }

    def class_names(self) -> list[str]:
        """This dataset's shape x colour classes in label order (the built-in ones, then the extra shapes')."""
        return class_names(self.shapes)
